"""On-policy preference pairs for the demo: sample the SFT model, judge each sample by its final number.

For every training question the SFT model writes `samples` answers at temperature `temperature`. A sample whose
final number (prefpipe.pipeline.answers) equals the gold one is right, any other sample is wrong (a missing number
included). Identical texts count once. A question yields pairs only when it has both kinds: its right and wrong
samples are zipped into up to `pairs_per_question` (chosen, rejected) pairs. Questions the model always gets right,
or always wrong, carry no preference signal and give none.

The KTO view holds the same pairs split into single examples (chosen: label true, rejected: label false), so that
KTO sees exactly the information DPO sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from prefpipe.pipeline.answers import extract_answer, gold_answer


@dataclass(frozen=True)
class PairSettings:
    samples: int = 8
    temperature: float = 1.0
    pairs_per_question: int = 2
    max_new_tokens: int = 24
    batch_size: int = 512
    seed: int = 0


def sample_pairs(model, tokenizer, prompts: list[str], answers: list[str], s: PairSettings,
                 log=print) -> tuple[list[dict], dict]:
    """Paired rows {prompt, chosen, rejected} and counts of what the sampling found."""
    from prefpipe.pipeline.generate import encode_prompts, hf_generate

    ids = encode_prompts(tokenizer, prompts)
    done = [0]

    def progress(n):
        done[0] += n
        if done[0] % 500 < n or done[0] == len(prompts):
            log(f"sampled {done[0]}/{len(prompts)} questions x {s.samples}")
    gens = hf_generate(model, tokenizer, ids, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                       num_samples=s.samples, temperature=s.temperature, seed=s.seed, progress=progress)
    rng = random.Random(s.seed)
    rows, n_right, n_total, mixed, all_right = [], 0, 0, 0, 0
    for prompt, answer, samples in zip(prompts, answers, gens):
        gold = gold_answer(answer)
        right, wrong = [], []
        for text in dict.fromkeys(samples):  # distinct, in order
            (right if extract_answer(text)[0] == gold else wrong).append(text)
        n_right += sum(extract_answer(t)[0] == gold for t in samples)
        n_total += len(samples)
        if right and wrong:
            mixed += 1
            rng.shuffle(right)
            rng.shuffle(wrong)
            for c, r in list(zip(right, wrong))[:s.pairs_per_question]:
                rows.append({"prompt": prompt, "chosen": c, "rejected": r})
        elif right:
            all_right += 1
    stats = {"questions": len(prompts), "samples": n_total, "sample_accuracy": n_right / max(1, n_total),
             "questions_with_pairs": mixed, "questions_all_right": all_right,
             "questions_all_wrong": len(prompts) - mixed - all_right, "pairs": len(rows)}
    return rows, stats


def kto_view(pairs: list[dict]) -> list[dict]:
    out = []
    for p in pairs:
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return out
