"""How sure the report can be: a 95% interval for each accuracy and a test of the best run against the runner-up.

Choices (docs/report.md says why):

- Interval: Wilson score interval. It stays inside [0, 1], keeps close to its nominal coverage down to n of about 20
  and to 0 or n correct, where the normal (Wald) interval collapses to zero width; closed form, no scipy.
- Comparison, runs that answered the same questions (every prefpipe evaluation of one RUNS_DIR does): exact
  McNemar test, a two-sided binomial test on the questions where exactly one of the two runs is right. The
  questions both get right or both get wrong say nothing about which run is better, and pairing removes the
  spread from question difficulty that an unpaired test counts as noise.
- Comparison, only counts known (no per-question verdicts, or different questions): Fisher's exact test on the
  2x2 table of right/wrong by run. On paired data it is conservative: more often "within noise", never less.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

LEVEL = 0.95
Z = NormalDist().inv_cdf(1 - (1 - LEVEL) / 2)  # 1.959963984540054
ALPHA = 1 - LEVEL


def wilson_interval(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials."""
    if n <= 0:
        return math.nan, math.nan
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at k = 0 (k = n) the bound is exactly 0 (1); rounding would leave it a hair off
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under 'no difference' each of the `only_a + only_b` discordant questions is
    a fair coin; p = P(a split at least as uneven as the observed one)."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact p-value of the table [[k1, n1 - k1], [k2, n2 - k2]]: the probability, with the margins
    fixed, of every table no more likely than the observed one."""
    total, right = n1 + n2, k1 + k2
    denom = math.comb(total, n1)

    def prob(x: int) -> float:
        return math.comb(right, x) * math.comb(total - right, n1 - x) / denom
    observed = prob(k1)
    lo, hi = max(0, right - n2), min(right, n1)
    return min(1.0, sum(p for p in map(prob, range(lo, hi + 1)) if p <= observed * (1 + 1e-9)))


@dataclass(frozen=True)
class Comparison:
    test: str  # "exact McNemar" or "Fisher exact"
    p: float
    detail: str  # what the test was run on, for the summary

    @property
    def within_noise(self) -> bool:
        return not self.p < ALPHA


def compare(a: tuple[int, int], b: tuple[int, int], verdicts_a: dict | None = None,
            verdicts_b: dict | None = None) -> Comparison:
    """Run A (k, n) against run B (k, n): paired when both have per-question verdicts on the same questions."""
    if verdicts_a and verdicts_b and verdicts_a.keys() == verdicts_b.keys():
        only_a = sum(verdicts_a[q] and not verdicts_b[q] for q in verdicts_a)
        only_b = sum(verdicts_b[q] and not verdicts_a[q] for q in verdicts_a)
        return Comparison("exact McNemar", mcnemar_exact(only_a, only_b),
                          f"{only_a} questions only the first got right, {only_b} only the second")
    return Comparison("Fisher exact", fisher_exact(*a, *b), f"{a[0]}/{a[1]} vs {b[0]}/{b[1]}")
