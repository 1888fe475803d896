"""Sampling, checking and pairing for `prefpipe demo --task flawed` (the rft, dpo and rounds arms).

This module is the demo's own stand-in for `prefpipe generate` (prefpipe/generation): every sample the arms train
on is drawn, judged and turned into training rows here and nowhere else, so that swapping in the shared sampler,
judge and pair rule touches only this file and the calls to it in prefpipe/demo/flawed_run.py.

- **Sampling**: `samples` answers per question at `temperature` (1: the policy's own distribution), by the same
  batched `hf_generate` the evaluation uses.
- **Checking**: a sample is right when its final number (prefpipe.answers) equals the question's
  *true* answer, never the demonstration's: the checker is exact where the demonstrations are not.
- **Pairs** (dpo, rounds): the default demo's rule (prefpipe.demo.pairs.pairs_for_question): the most frequent wrong
  samples, each against the most frequent right one. On a carry question the most frequent wrong sample is the
  dropped carry, the answer greedy decoding would print.
- **Correct samples** (rft): every right sample, repeats included, so that rft trains on the policy's own
  distribution restricted to what the checker accepts (rejection-sampling fine-tuning).
"""

from __future__ import annotations

from prefpipe.demo.flawed import prompt_of
from prefpipe.demo.pairs import PairSettings, pairs_for_question
from prefpipe.answers import extract_answer, gold_answer
from prefpipe.progress_bar import progress_bar
from prefpipe.tokenizer import load_tokenizer

# `prefpipe train --loss_type sft` reads pairs and forwards only `chosen` (docs/losses.md); the rejected column of
# an SFT row is never scored, but the row format needs one that differs from chosen.
UNUSED_REJECTED = "?"


def sample_and_check(model_dir: str, rows: list[dict], s: PairSettings, *, device: str = "cpu") -> list[dict]:
    """One record per row: {prompt, true, carry, samples (texts), right (bools)}."""
    # torch (both): only when sampling
    from prefpipe.evaluation.generate import encode_prompts, hf_generate
    from prefpipe.modeling import load_model

    model = load_model(model_dir, device=device).eval()
    tok = load_tokenizer(model_dir)
    prompts = [prompt_of(r) for r in rows]
    with progress_bar(len(prompts), f"sampling x {s.samples}", "question") as bar:
        gens = hf_generate(model, tok, encode_prompts(tok, prompts), max_new_tokens=s.max_new_tokens,
                           batch_size=s.batch_size, num_samples=s.samples, temperature=s.temperature, seed=s.seed,
                           progress=bar.update)
    out = []
    for prompt, r, samples in zip(prompts, rows, gens):
        true = gold_answer(r["true_answer"])
        out.append({"prompt": prompt, "true": true, "carry": r["carry"], "samples": samples,
                    "right": [extract_answer(t)[0] == true for t in samples]})
    return out


def pair_rows(checked: list[dict], k: int) -> list[dict]:
    """{prompt, chosen, rejected} by the default demo's rule, up to k per question."""
    rows = []
    for c in checked:
        rows += pairs_for_question(c["prompt"], c["true"], c["samples"], k)
    return rows


def correct_rows(checked: list[dict]) -> list[dict]:
    """Every right sample as an SFT row (chosen = the sample), repeats included."""
    return [{"prompt": c["prompt"], "chosen": t, "rejected": UNUSED_REJECTED}
            for c in checked for t, ok in zip(c["samples"], c["right"]) if ok]


def sample_stats(checked: list[dict], k: int) -> dict:
    """What the sampling found: accuracy of the samples (all, carries), and how many questions give pairs."""
    def acc(cs):
        n = sum(len(c["right"]) for c in cs)
        return sum(sum(c["right"]) for c in cs) / n if n else None

    carries = [c for c in checked if c["carry"]]
    mixed = [c for c in checked if any(c["right"]) and not all(c["right"])]
    return {"questions": len(checked), "sample_accuracy": acc(checked), "carry_sample_accuracy": acc(carries),
            "questions_with_pairs": len(mixed), "carry_questions_with_pairs": sum(c["carry"] for c in mixed),
            "pairs": len(pair_rows(checked, k)), "correct_samples": sum(sum(c["right"]) for c in checked)}
