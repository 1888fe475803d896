"""`prefpipe report RUNS_DIR`: plots and a markdown table that say which run did best, and on which number.

Reads what training and evaluation left in RUNS_DIR (file names from `prefpipe.rundir`): `<run>/result.json`,
`<run>/metrics.jsonl` (train steps and in-training evaluations), and when present `<run>/eval_gen.json`,
`<run>/eval_pref.json` and the SFT model's own `reference/eval_gen.json`. Writes `curves.png`, `beta.png` and
`summary.md`.

Ranking. Runs are ranked on the most trustworthy number that exists, in this order:

1. downstream accuracy (`<run>/eval_gen.json`);
2. held-out implicit-reward accuracy (`<run>/eval_pref.json`; the same quantity for every loss);
3. the last in-training evaluation (`"split": "eval"` lines in metrics.jsonl, else result.json's `eval`);
4. the last training step (one global batch: a weak signal).

Only runs that have the chosen number compete; the others are listed below the winner and named as not ranked.
At levels 3 and 4 each loss logs its own kind of accuracy (DPO and hinge: summed reward accuracy; IPO: on
per-token log-ratios; KTO: the side of the reference point; ORPO: a_c > a_r on per-token log-probs; SFT: none),
so only runs whose accuracy means the same thing are ranked against each other (the kinds are tried in the order
dpo/hinge, ipo, kto, orpo). The basis is always named ("in-training eval reward accuracy"). When the top value
is shared by several runs there is no winner: summary.md says "No single best run (tie between A, B at ...)" and
`write_report(...)["best"]` is None.

Uncertainty (prefpipe.evaluation.stats; docs/report.md). Where the counts behind an accuracy are known (downstream:
correct / n; held-out: wins / rows; in-training and train-step accuracies: acc x examples), it is given with a
Wilson 95% interval, and the best run is tested against the runner-up: an exact McNemar test on the questions only
one of them answered right when both have per-question verdicts (`eval_gen.jsonl`) on the same questions, else
Fisher's exact test on the two counts. p >= 0.05 is reported as "within noise of the runner-up": the best run is
still named (it is the best estimate), but the data do not tell the two apart.

Plots. Every panel compares like with like:

- `curves.png`: one column per loss family (dpo+hinge, ipo, kto, orpo+sft, any other loss alone) and one row per
  metric: the loss divided by the run's own step-1 loss (so a family whose scale depends on beta, like IPO's
  (1/2β)², still shares an axis; every curve starts near 1), that family's accuracy, and the margin divided by β
  (the log-ratio margin itself, which does not grow with β by construction; ORPO's a_c - a_r is not divided).
  Training curves are solid: a trailing mean over a tenth of the run (a run under 20 steps is not smoothed; the
  title says which window was used); in-training evaluations are dashed, with markers, in the same colour as
  their run. A step without a value (a KTO batch with only one label has no margin) is left out of the line.
- `beta.png`: top row held-out reward accuracy and downstream accuracy against β for every run (losses without
  β and the SFT model as horizontal lines); below, for each β-using family, its accuracy and margin / β against
  β, from the last in-training evaluation when every run of the family has one, else from the last train step.
  The best run, when there is one, is starred. Only panels with data are drawn (no empty slots for, e.g., the
  margin of a KTO run whose last batch had one label).

Runs are ordered, in legends and plots, by loss type (prefpipe.train.losses.LOSS_TYPES order) and then β as a
number. Every panel has its own legend. The plots are built as data in prefpipe.evaluation.plots.
"""

from __future__ import annotations

import math
from pathlib import Path

from prefpipe.evaluation.plots import plot_beta, plot_curves
from prefpipe.evaluation.ranking import Ranking, headline, interval_text, noise_text, pct, rank
from prefpipe.evaluation.runs import DOWNSTREAM, RunData, load_runs, num
from prefpipe.evaluation.stats import wilson_interval
from prefpipe.fileio import atomic_write_text
from prefpipe.rundir import RunsDir

__all__ = ["load_runs", "plot_beta", "plot_curves", "rank", "summary_markdown", "write_report"]


# ---------------------------------------------------------------- summary.md

def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _ci(right, n) -> str:
    ok = isinstance(right, int) and isinstance(n, int) and n > 0
    return interval_text(wilson_interval(right, n) if ok else None)


def _headline_markdown(ranking: Ranking, reference: dict | None) -> list[str]:
    best = ranking.best
    if best is None:
        return [f"**{headline(ranking)}**.", ""]
    k_n = ranking.counts.get(best)
    value = pct(ranking.value) if k_n is None else \
        f"{pct(ranking.value)}, {k_n[0]}/{k_n[1]}, 95% CI {interval_text(ranking.interval(best))}"
    line = f"**Best run: {best.name}** ({ranking.basis} {value}"
    if reference is not None and ranking.basis == DOWNSTREAM:
        gain = best.gen["accuracy"] - reference["accuracy"]
        line += f"; the SFT model scores {pct(reference['accuracy'])}, a change of {100 * gain:+.1f} points"
    noise = noise_text(ranking)
    return [line + (f"); {noise}." if noise else ")."), ""]


def summary_markdown(runs: list[RunData], reference: dict | None, ranking: Ranking | None = None) -> str:
    ranking = ranking or rank(runs)
    lines = ["# prefpipe report", ""] + _headline_markdown(ranking, reference)
    if ranking.others and ranking.pool:
        lines += [f"Not ranked (no {ranking.basis}): {', '.join(r.name for r in ranking.others)}.", ""]
    head = ["run", "loss", "β", "steps", "final loss", "final acc", "final margin"]
    has_eval = any(r.last_eval for r in runs)
    has_pref, has_gen = any(r.pref for r in runs), any(r.gen for r in runs)
    if has_eval:
        head += ["eval acc", "eval margin"]
    if has_pref:
        head += ["held-out acc", "95% CI", "held-out margin"]
    if has_gen:
        head += ["downstream acc", "correct / n", "95% CI"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if reference is not None and has_gen:
        dashes = ["–"] * (2 * has_eval + 3 * has_pref)
        row = ["SFT model (reference)", "–", "–", "0", "–", "–", "–"] + dashes
        row += [pct(reference["accuracy"]), f"{reference['correct']} / {reference['n']}",
                _ci(reference.get("correct"), reference.get("n"))]
        lines.append("| " + " | ".join(row) + " |")
    for r in ranking.pool + ranking.others:
        lines.append("| " + " | ".join(_table_row(r, ranking, has_eval, has_pref, has_gen)) + " |")
    lines += ["", "Final values are from the last training step (one global batch); eval values from the last "
              "in-training evaluation. Each loss logs its own accuracy (see the report's docstring). 95% CI: "
              "Wilson score interval; \"within noise\": the best run's lead over the runner-up is not significant "
              "at the 5% level (exact McNemar test on the questions where the two disagree when both runs' "
              "per-question verdicts are there, else Fisher's exact test on the counts).",
              "", "Plots: `curves.png` (loss ÷ its step-1 value, accuracy and margin / β against step, one column "
              "per loss family; dashed: in-training eval), `beta.png` (held-out, downstream and training metrics "
              "against β).", ""]
    return "\n".join(lines)


def _table_row(r: RunData, ranking: Ranking, has_eval: bool, has_pref: bool, has_gen: bool) -> list[str]:
    name = f"**{r.name}** ★" if r is ranking.best else (f"{r.name} (tie)" if r in ranking.tied else r.name)
    row = [name, r.loss_type, "–" if r.beta_free else f"{r.beta:g}", str(len(r.steps)),
           _fmt(num(r.final.get("loss"))), _fmt(num(r.final.get("acc"))), _fmt(num(r.final.get("margin")))]
    if has_eval:
        ev = r.last_eval or {}
        row += [_fmt(num(ev.get("acc"))), _fmt(num(ev.get("margin")))]
    if has_pref:
        p = r.pref
        row += [pct(num(p.get("acc"))), _ci(p.get("wins"), p.get("rows")), _fmt(num(p.get("margin")))] if p \
            else ["–"] * 3
    if has_gen:
        g = r.gen
        row += [pct(num(g.get("accuracy"))), f"{g.get('correct')} / {g.get('n')}", _ci(g.get("correct"), g.get("n"))] \
            if g else ["–"] * 3
    return row


def write_report(runs_dir: str | Path, only: list[str] | None = None) -> dict:
    """Write curves.png, beta.png and summary.md into RUNS_DIR; return their paths and the ranking.

    `best` is the winning run's name, or None on a tie at the top (or when no run has an accuracy); `basis` names
    the number ranked on and `value` is the top value (a float, nan when nothing was ranked); `tied` lists the
    runs sharing it; `noise` (None without a runner-up with counts) says whether the lead over the runner-up is
    more than noise (prefpipe.evaluation.stats). `only` names the run directories to include (the pipeline
    passes its own runs, so that runs left in RUNS_DIR by an earlier, different config do not appear);
    `prefpipe report` includes every run."""
    d = RunsDir(runs_dir)
    runs, reference = load_runs(d.path, only)
    ranking = rank(runs)
    plot_curves(runs, d.report_file("curves"))
    plot_beta(runs, reference, d.report_file("beta"), ranking)
    text = summary_markdown(runs, reference, ranking)
    atomic_write_text(d.report_file("summary"), text)
    return {**{k: str(d.report_file(k)) for k in ("curves", "beta", "summary")},
            "best": ranking.best.name if ranking.best else None, "basis": ranking.basis, "value": ranking.value,
            "tied": [r.name for r in ranking.tied], "headline": headline(ranking), "markdown": text,
            "noise": _noise(ranking)}


def _noise(ranking: Ranking) -> dict | None:
    """The best run against the runner-up: the test, its p-value and whether the lead is within noise."""
    c = ranking.comparison
    if c is None:
        return None
    return {"runner_up": ranking.runner_up.name, "test": c.test, "p": c.p, "within_noise": c.within_noise,
            "detail": c.detail}
