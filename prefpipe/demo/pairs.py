"""On-policy preference pairs for the demo: sample the SFT model, judge each sample by its final number.

For every training question the SFT model writes `samples` answers at temperature `temperature`. A sample whose
final number (prefpipe.answers) equals the gold one is right, any other sample is wrong (a missing number
included). A question yields pairs only when it has both kinds; questions the model always gets right, or always
wrong, carry no preference signal and give none.

Which samples are paired matters: the rejected answers are the question's most frequent wrong samples, the chosen
its most frequent right ones, up to `pairs_per_question` pairs. A wrong answer the model gives 5 times in 8 is the
one greedy decoding would print; a wrong answer sampled once at temperature 1 is usually improbable already, and
pushing it down changes nothing the model would say. (Measured: with a randomly drawn wrong sample, DPO lowered
held-out accuracy at every learning rate from 2e-5 to 5e-4 and beta from 0.05 to 1 that was tried.)

The KTO view holds the same answers as single examples (chosen: label true, rejected: label false), so that KTO
sees exactly the information DPO sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefpipe.answers import extract_answer, gold_answer
from prefpipe.generation.pairs import build_pairs
from prefpipe.generation.samples import Sample
from prefpipe.progress_bar import progress_bar


PAIR_RULE = "most frequent wrong vs most frequent right"  # part of the pairs' cache key


@dataclass(frozen=True)
class PairSettings:
    """How the SFT model is sampled and its answers paired, in both demos (`prefpipe demo`, and `--task flawed`
    through prefpipe.demo.flawed_rounds)."""
    samples: int = 8
    temperature: float = 1.0
    pairs_per_question: int = 2
    max_new_tokens: int = 10
    batch_size: int = 512
    seed: int = 0


def pairs_for_question(prompt: str, gold: str, samples: list[str], k: int) -> list[dict]:
    """Up to k pairs: the most frequent wrong samples, each against the most frequent right ones in turn
    (`prefpipe.generation.pairs`' correct_vs_incorrect rule)."""
    ids: dict[str, int] = {}  # this sampler returns text only: one id per distinct text groups identical answers
    judged = [Sample(prompt_index=0, row_id="", sample_index=i, prompt=prompt, prompt_ids=[], completion=text,
                     completion_ids=[ids.setdefault(text, len(ids))], finish_reason="stop",
                     reward=float(extract_answer(text)[0] == gold))
              for i, text in enumerate(samples)]
    pairs, _ = build_pairs(judged, rule="correct_vs_incorrect", pairs_per_prompt=k)
    return [{"prompt": prompt, "chosen": c.completion, "rejected": r.completion} for c, r in pairs]


def sample_pairs(model, tokenizer, prompts: list[str], answers: list[str],
                 s: PairSettings) -> tuple[list[dict], dict]:
    """Paired rows {prompt, chosen, rejected} and counts of what the sampling found."""
    from prefpipe.evaluation.generate import encode_prompts, hf_generate  # torch

    ids = encode_prompts(tokenizer, prompts)
    with progress_bar(len(prompts), f"pairs: sampling x {s.samples}", "question") as bar:
        gens = hf_generate(model, tokenizer, ids, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                           num_samples=s.samples, temperature=s.temperature, seed=s.seed, progress=bar.update)
    rows, n_right, n_total, mixed, all_right = [], 0, 0, 0, 0
    for prompt, answer, samples in zip(prompts, answers, gens):
        gold = gold_answer(answer)
        n = sum(extract_answer(t)[0] == gold for t in samples)
        n_right += n
        n_total += len(samples)
        found = pairs_for_question(prompt, gold, samples, s.pairs_per_question)
        rows += found
        mixed += bool(found)
        all_right += n == len(samples)
    stats = {"questions": len(prompts), "samples": n_total, "sample_accuracy": n_right / max(1, n_total),
             "questions_with_pairs": mixed, "questions_all_right": all_right,
             "questions_all_wrong": len(prompts) - mixed - all_right, "pairs": len(rows)}
    return rows, stats


def kto_view(pairs: list[dict]) -> list[dict]:
    """Chosen answers labelled true, rejected false; an answer in two pairs appears once."""
    out, seen = [], set()
    for p in pairs:
        for text, label in ((p["chosen"], True), (p["rejected"], False)):
            if (p["prompt"], text) not in seen:
                seen.add((p["prompt"], text))
                out.append({"prompt": p["prompt"], "completion": text, "label": label})
    return out
