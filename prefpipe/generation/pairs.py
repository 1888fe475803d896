"""Preference pairs, and KTO rows, from one prompt's judged samples.

Identical completions (the same `completion_ids`) count as one completion, represented by its first sample, so a
completion is never paired with itself and a frequent answer is not paired twice over. A prompt that gives no
pair gets one reason from `NO_PAIR_REASONS`, counted by `PairCounts` (nothing is dropped silently).

Rules (`PAIR_RULES`):

- ``correct_vs_incorrect`` (the default for binary judges). Correct means reward >= 0.5. The distinct
  completions are ordered by how often they were sampled (ties keep sampling order); the i-th most frequent
  incorrect one is rejected against the (i mod #correct)-th most frequent correct one, for i < pairs_per_prompt.
  Frequent answers are the ones the model would actually give; pushing down a wrong answer sampled once at high
  temperature changes little it would say (the demo measured it: `prefpipe.demo.pairs`). No incorrect
  completion: ``all_correct``; no correct one: ``all_wrong``. A pair whose margin (chosen - rejected reward) is
  below `min_margin` is dropped; none left: ``below_margin``.
- ``best_vs_worst`` (the default for real-valued judges). The distinct completions are ranked by reward (ties
  keep sampling order): pair i is the i-th best against the i-th worst, for i < pairs_per_prompt, stopping at the
  first pair whose margin is 0 or below `min_margin`. Every pair has a positive margin, so no completion is both
  chosen and rejected (a chosen one outranks every rejected one). Best == worst: ``all_equal``; best - worst
  below `min_margin`: ``below_margin``.

Either rule: fewer than 2 samples: ``too_few_samples``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from prefpipe.generation.samples import Sample

PAIR_RULES = ("correct_vs_incorrect", "best_vs_worst")
NO_PAIR_REASONS = ("all_correct", "all_wrong", "all_equal", "below_margin", "too_few_samples")
CORRECT = 0.5  # a binary judge's 1.0 is correct, its 0.0 is not

Pair = tuple[Sample, Sample]  # (chosen, rejected)


def default_rule(binary: bool) -> str:
    return "correct_vs_incorrect" if binary else "best_vs_worst"


def distinct(samples: list[Sample]) -> list[tuple[Sample, int]]:
    """(first sample, times sampled) per distinct `completion_ids`, in order of first appearance."""
    groups: dict[tuple, list] = {}
    for s in samples:
        g = groups.setdefault(tuple(s.completion_ids), [s, 0])
        g[1] += 1
    return [(s, n) for s, n in groups.values()]


def _check_judged(samples: list[Sample]) -> None:
    for s in samples:
        if s.reward is None or not math.isfinite(s.reward):
            raise ValueError(f"sample {s.sample_index} of prompt {s.prompt_index} has no finite reward "
                             f"({s.reward!r}); judge the samples first")


def build_pairs(samples: list[Sample], *, rule: str, pairs_per_prompt: int,
                min_margin: float = 0.0) -> tuple[list[Pair], str | None]:
    """One prompt's (chosen, rejected) pairs by `rule` (module docstring), and None, or [] and the reason."""
    if rule not in PAIR_RULES:
        raise ValueError(f"unknown pair rule {rule!r}; choose {', '.join(PAIR_RULES)}")
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1 (got {pairs_per_prompt})")
    _check_judged(samples)
    if len(samples) < 2:
        return [], "too_few_samples"
    groups = distinct(samples)
    if rule == "correct_vs_incorrect":
        return _correct_vs_incorrect(groups, pairs_per_prompt, min_margin)
    return _best_vs_worst([s for s, _ in groups], pairs_per_prompt, min_margin)


def _correct_vs_incorrect(groups: list[tuple[Sample, int]], k: int, min_margin: float):
    by_count = [s for s, _ in sorted(groups, key=lambda g: -g[1])]  # sorted() is stable: ties keep sampling order
    right = [s for s in by_count if s.reward >= CORRECT]
    wrong = [s for s in by_count if s.reward < CORRECT]
    if not wrong:
        return [], "all_correct"
    if not right:
        return [], "all_wrong"
    pairs = [(right[i % len(right)], wrong[i]) for i in range(min(k, len(wrong)))]
    kept = [(c, r) for c, r in pairs if c.reward - r.reward >= min_margin]
    return (kept, None) if kept else ([], "below_margin")


def _best_vs_worst(completions: list[Sample], k: int, min_margin: float):
    best_first = sorted(completions, key=lambda s: -s.reward)
    worst_first = sorted(completions, key=lambda s: s.reward)
    margin = best_first[0].reward - worst_first[0].reward
    if margin == 0:
        return [], "all_equal"
    if margin < min_margin:
        return [], "below_margin"
    pairs = []
    for chosen, rejected in zip(best_first[:k], worst_first[:k]):
        margin = chosen.reward - rejected.reward
        if margin <= 0 or margin < min_margin:
            break
        pairs.append((chosen, rejected))
    return pairs, None


def kto_rows(samples: list[Sample], *, binary: bool, threshold: float | None = None) -> list[tuple[Sample, bool]]:
    """(sample, desirable) for each distinct completion of one prompt, in sampling order. Desirable: reward >= 0.5
    for a binary judge, reward > `threshold` for a real-valued one (which must give a threshold)."""
    if not binary and threshold is None:
        raise ValueError("a real-valued judge's KTO rows need a threshold")
    _check_judged(samples)
    return [(s, s.reward >= CORRECT if binary else s.reward > threshold) for s, _ in distinct(samples)]


@dataclass
class PairCounts:
    """Prompts by outcome (with pairs, or the reason they gave none) and the pairs made."""
    prompts: int = 0
    with_pairs: int = 0
    all_correct: int = 0
    all_wrong: int = 0
    all_equal: int = 0
    below_margin: int = 0
    too_few_samples: int = 0
    pairs: int = 0

    def add(self, pairs: list[Pair], reason: str | None) -> None:
        """Count one prompt's `build_pairs` result."""
        if bool(pairs) == (reason is not None) or (reason is not None and reason not in NO_PAIR_REASONS):
            raise ValueError(f"a prompt gives pairs or a known reason, not {len(pairs)} pairs and {reason!r}")
        self.prompts += 1
        self.pairs += len(pairs)
        if pairs:
            self.with_pairs += 1
        else:
            setattr(self, reason, getattr(self, reason) + 1)

    def to_dict(self) -> dict:
        return asdict(self)
