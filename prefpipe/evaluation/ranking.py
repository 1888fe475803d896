"""Which run did best, on which number, and whether the lead is more than noise (module docstring of
prefpipe.evaluation.report; the statistics in prefpipe.evaluation.stats)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prefpipe.evaluation.runs import DOWNSTREAM, HELD_OUT, KINDS, RunData, meaning, num, run_order
from prefpipe.evaluation.stats import Comparison, compare, wilson_interval


@dataclass
class Ranking:
    basis: str  # the number the runs were ranked on, e.g. "downstream accuracy"
    value: float  # the top value (nan when nothing could be ranked)
    best: RunData | None  # None on a tie at the top or when nothing could be ranked
    tied: list  # the runs sharing the top value (just `best` when there is one)
    pool: list  # the runs that were ranked, best first
    others: list  # the runs without the basis, in their own order
    counts: dict = field(default_factory=dict)  # run -> (right, n) behind its basis value, where known
    comparison: Comparison | None = None  # best against the runner-up (pool[1]), when both have counts

    @property
    def runner_up(self) -> RunData | None:
        return self.pool[1] if self.best is not None and len(self.pool) > 1 else None

    def interval(self, run: RunData) -> tuple[float, float] | None:
        return wilson_interval(*self.counts[run]) if run in self.counts else None


def _counts(right, n) -> tuple[int, int] | None:
    ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (right, n)) and n > 0
    return (int(round(right)), int(n)) if ok else None


def _record_counts(rec: dict) -> tuple[int, int] | None:
    """(right, n) of a logged accuracy: its mean times the examples it was taken over."""
    n = rec.get("examples")
    return _counts(num(rec.get("acc")) * n, n) if isinstance(n, int) else None


def candidates(run: RunData) -> list[tuple[tuple, str, float, tuple[int, int] | None]]:
    """Every number `run` could be ranked on: (priority, basis, value, (right, n) or None), most trustworthy
    first."""
    out = []
    if run.gen is not None:
        out.append(((0, 0), DOWNSTREAM, num(run.gen.get("accuracy")),
                    _counts(run.gen.get("correct"), run.gen.get("n"))))
    if run.pref is not None:
        out.append(((1, 0), HELD_OUT, num(run.pref.get("acc")), _counts(run.pref.get("wins"), run.pref.get("rows"))))
    kind = meaning(run.loss_type).kind
    kind_rank = KINDS.index(kind) if kind in KINDS else len(KINDS)
    if run.last_eval is not None:
        out.append(((2, kind_rank), f"in-training eval {kind}", num(run.last_eval.get("acc")),
                    _record_counts(run.last_eval)))
    out.append(((3, kind_rank), f"final train-step {kind}", num(run.final.get("acc")), _record_counts(run.final)))
    return [c for c in out if not math.isnan(c[2])]


def _best_key(run: RunData) -> tuple:
    c = candidates(run)
    return (c[0][0], -c[0][2]) if c else ((9, 0), 0.0)


def _verdicts(run: RunData, basis: str) -> dict | None:
    return run.verdicts if basis == DOWNSTREAM else None


def _compare(basis: str, a: RunData, b: RunData, counts: dict) -> Comparison | None:
    if a not in counts or b not in counts:
        return None
    same_questions = basis == DOWNSTREAM and (a.gen or {}).get("data") == (b.gen or {}).get("data")
    return compare(counts[a], counts[b], *((a.verdicts, b.verdicts) if same_questions else (None, None)))


def rank(runs: list[RunData]) -> Ranking:
    """Rank `runs` on the best basis any of them has (module docstring); a shared top value is a tie."""
    by_basis: dict[str, tuple[tuple, list]] = {}
    for r in runs:
        for prio, basis, value, counts in candidates(r):
            by_basis.setdefault(basis, (prio, []))[1].append((r, value, counts))
    if not by_basis:
        return Ranking("no accuracy to rank on", math.nan, None, [], [], sorted(runs, key=run_order))
    basis = min(by_basis, key=lambda b: by_basis[b][0])
    scored = sorted(by_basis[basis][1], key=lambda rv: (-rv[1], run_order(rv[0])))
    top = scored[0][1]
    tied = [r for r, v, _ in scored if math.isclose(v, top, rel_tol=0, abs_tol=1e-12)]
    pool = [r for r, _, _ in scored]
    counts = {r: c for r, _, c in scored if c is not None}
    others = sorted((r for r in runs if r not in pool), key=lambda r: (_best_key(r), run_order(r)))
    ranking = Ranking(basis, top, tied[0] if len(tied) == 1 else None, tied, pool, others, counts)
    if ranking.runner_up is not None:
        ranking.comparison = _compare(basis, ranking.best, ranking.runner_up, counts)
    return ranking


# ---------------------------------------------------------------- the headline

def pct(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}%"


def interval_text(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%"


def _value_text(ranking: Ranking, run: RunData, value: float) -> str:
    """'25.0%, 5/20, 95% CI 11.2–46.9%' (just the percentage when the counts are not known)."""
    if run not in ranking.counts:
        return pct(value)
    k, n = ranking.counts[run]
    return f"{pct(value)}, {k}/{n}, 95% CI {interval_text(ranking.interval(run))}"


def _p_text(p: float) -> str:
    return f"p = {p:.2g}" if p < 0.001 else f"p = {p:.3f}"


def noise_text(ranking: Ranking) -> str:
    """How the best run stands against the runner-up: 'within noise of ...' or 'ahead of ... beyond noise'."""
    c, second = ranking.comparison, ranking.runner_up
    if second is None:
        return ""
    value = num(next(v for _, b, v, _ in candidates(second) if b == ranking.basis))
    if c is None:
        return f"runner-up {second.name} at {pct(value)} (not tested against noise: the counts are not recorded)"
    k, n = ranking.counts[second]
    if c.within_noise:
        return f"within noise of the runner-up {second.name} ({pct(value)}, {k}/{n}; {c.test} {_p_text(c.p)})"
    return f"ahead of the runner-up {second.name} ({pct(value)}, {k}/{n}) beyond noise ({c.test} {_p_text(c.p)})"


def headline(ranking: Ranking) -> str:
    if ranking.best is not None:
        line = f"Best run: {ranking.best.name} ({ranking.basis} {_value_text(ranking, ranking.best, ranking.value)})"
        noise = noise_text(ranking)
        return f"{line}; {noise}" if noise else line
    if ranking.tied:
        return (f"No single best run (tie between {', '.join(r.name for r in ranking.tied)} at {ranking.basis} "
                f"{pct(ranking.value)})")
    return "No single best run (no run has an accuracy to rank on)"
