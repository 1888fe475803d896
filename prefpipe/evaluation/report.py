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

Plots. Every panel compares like with like:

- `curves.png`: one column per loss family (dpo+hinge, ipo, kto, orpo+sft, any other loss alone) and one row per
  metric: the loss divided by the run's own step-1 loss (so a family whose scale depends on beta, like IPO's
  (1/2β)², still shares an axis; every curve starts near 1), that family's accuracy, and the margin divided by β
  (the log-ratio margin itself, which does not grow with β by construction; ORPO's a_c - a_r is not divided).
  Training curves are solid (a moving average over a tenth of the run); in-training evaluations are dashed, with
  markers, in the same colour as their run.
- `beta.png`: top row held-out reward accuracy and downstream accuracy against β for every run (losses without
  β and the SFT model as horizontal lines); below, for each β-using family, its accuracy and margin / β against
  β, from the last in-training evaluation when every run of the family has one, else from the last train step.
  The best run, when there is one, is starred.

Runs are ordered, in legends and plots, by loss type (prefpipe.train.losses.LOSS_TYPES order) and then β as a
number. Every panel that has lines has its own legend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from prefpipe.errors import UserError
from prefpipe.fileio import atomic_write_text
from prefpipe.rundir import RunsDir
from prefpipe.train.loss_names import LOSS_TYPES, LOSSES

# Losses whose logged acc and margin mean the same thing share a column of curves.png.
FAMILIES = (("dpo", "hinge"), ("ipo",), ("kto",), ("orpo", "sft"))
# What each loss's training `acc` is: (short name for the ranking basis, axis label).
ACC_KIND = {"dpo": ("reward accuracy", "reward accuracy"),
            "hinge": ("reward accuracy", "reward accuracy"),
            "ipo": ("per-token reward accuracy", "reward accuracy (per-token log-ratios)"),
            "kto": ("KTO accuracy", "KTO accuracy (h on the right side of z0)"),
            "orpo": ("ORPO accuracy", "ORPO accuracy (a_c > a_r, per-token log-probs)")}
MARGIN_LABEL = {"dpo": "margin / β (log-ratio, nats)", "hinge": "margin / β (log-ratio, nats)",
                "ipo": "margin / β (per-token log-ratio)", "kto": "margin / β (log-ratio, nats)",
                "orpo": "a_c − a_r (per-token log-prob)"}
DOWNSTREAM, HELD_OUT = "downstream accuracy", "held-out reward accuracy"


@dataclass(eq=False)  # a run is itself: `in` and `is` mean the same run
class RunData:
    name: str
    loss_type: str
    beta: float
    steps: list = field(default_factory=list)  # train records from metrics.jsonl
    final: dict = field(default_factory=dict)
    gen: dict | None = None
    pref: dict | None = None
    evals: list = field(default_factory=list)  # in-training evaluation records from metrics.jsonl
    result_eval: dict | None = None  # result.json's "eval": the last evaluation

    @property
    def beta_free(self) -> bool:
        try:
            return not LOSSES[self.loss_type].uses_beta
        except KeyError:  # a run of a loss this prefpipe does not know
            return False

    @property
    def last_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else self.result_eval


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e})", file=str(path))


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of one metrics.jsonl."""
    if not path.exists():
        return [], []
    train, evals = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError("not valid JSON", file=str(path), row=n)
        split = rec.get("split", "train")
        if split == "train":
            train.append(rec)
        elif split == "eval":
            evals.append(rec)
    return train, evals


def load_runs(runs_dir: str | Path, only: list[str] | None = None) -> tuple[list[RunData], dict | None]:
    """Every run under RUNS_DIR (directories with a result.json; only the named ones when `only` is given), and
    the SFT model's evaluation if any."""
    d = RunsDir(runs_dir)
    if not d.path.is_dir():
        raise UserError("no such runs directory", file=str(d.path))
    runs = []
    for sub in d.runs():
        if only is not None and sub.name not in only:
            continue
        result = _read_json(sub.result)
        train, evals = _read_metrics(sub.metrics)
        runs.append(RunData(result.get("name", sub.name), result.get("loss_type", "?"), float(result.get("beta", 0)),
                            train, result.get("final") or {}, _read_json(sub.eval_gen), _read_json(sub.eval_pref),
                            evals, result.get("eval") or None))
    if not runs:
        raise UserError("no training runs here (expected <run>/result.json from prefpipe train)", file=str(d.path))
    return runs, _read_json(d.reference.eval_gen)


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.nan


def _smooth(ys: list[float], window: int) -> list[float]:
    out, vals = [], []
    for y in ys:
        vals.append(y)
        if len(vals) > window:
            vals.pop(0)
        finite = [v for v in vals if not math.isnan(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def run_order(run: RunData) -> tuple:
    """Loss type in LOSS_TYPES order (others after, by name), then β as a number, then name."""
    lt = run.loss_type
    return (LOSS_TYPES.index(lt) if lt in LOSS_TYPES else len(LOSS_TYPES), lt, run.beta, run.name)


# ---------------------------------------------------------------- ranking

@dataclass
class Ranking:
    basis: str  # the number the runs were ranked on, e.g. "downstream accuracy"
    value: float  # the top value (nan when nothing could be ranked)
    best: RunData | None  # None on a tie at the top or when nothing could be ranked
    tied: list  # the runs sharing the top value (just `best` when there is one)
    pool: list  # the runs that were ranked, best first
    others: list  # the runs without the basis, in their own order


def candidates(run: RunData) -> list[tuple[tuple, str, float]]:
    """Every number `run` could be ranked on: (priority, basis, value), most trustworthy first."""
    out = []
    if run.gen is not None:
        out.append(((0, 0), DOWNSTREAM, _num(run.gen.get("accuracy"))))
    if run.pref is not None:
        out.append(((1, 0), HELD_OUT, _num(run.pref.get("acc"))))
    kind = ACC_KIND.get(run.loss_type, (f"{run.loss_type} accuracy",))[0]
    kinds = list(dict.fromkeys(k for k, _ in ACC_KIND.values()))
    kind_rank = kinds.index(kind) if kind in kinds else len(kinds)
    if run.last_eval is not None:
        out.append(((2, kind_rank), f"in-training eval {kind}", _num(run.last_eval.get("acc"))))
    out.append(((3, kind_rank), f"final train-step {kind}", _num(run.final.get("acc"))))
    return [c for c in out if not math.isnan(c[2])]


def _best_key(run: RunData) -> tuple:
    c = candidates(run)
    return (c[0][0], -c[0][2]) if c else ((9, 0), 0.0)


def rank(runs: list[RunData]) -> Ranking:
    """Rank `runs` on the best basis any of them has (module docstring); a shared top value is a tie."""
    by_basis: dict[str, tuple[tuple, list]] = {}
    for r in runs:
        for prio, basis, value in candidates(r):
            by_basis.setdefault(basis, (prio, []))[1].append((r, value))
    if not by_basis:
        return Ranking("no accuracy to rank on", math.nan, None, [], [], sorted(runs, key=run_order))
    basis = min(by_basis, key=lambda b: by_basis[b][0])
    scored = sorted(by_basis[basis][1], key=lambda rv: (-rv[1], run_order(rv[0])))
    top = scored[0][1]
    tied = [r for r, v in scored if math.isclose(v, top, rel_tol=0, abs_tol=1e-12)]
    pool = [r for r, _ in scored]
    others = sorted((r for r in runs if r not in pool), key=lambda r: (_best_key(r), run_order(r)))
    return Ranking(basis, top, tied[0] if len(tied) == 1 else None, tied, pool, others)


# ---------------------------------------------------------------- plots: what each panel shows

@dataclass
class Series:
    label: str
    xs: list
    ys: list
    color: int | str  # an index into the run colours, or a matplotlib colour
    dashed: bool = False  # in-training evaluation, or a loss without β drawn as a horizontal line
    marker: str | None = None
    horizontal: bool = False  # a value that does not depend on x (drawn across the panel at ys[0])


@dataclass
class Panel:
    title: str
    ylabel: str
    xlabel: str = "step"
    series: list = field(default_factory=list)
    chance: bool = False  # draw the 0.5 line of a coin flip
    xticks: list | None = None  # β values (log scale when there are several)


def family(loss_type: str) -> tuple:
    return next((f for f in FAMILIES if loss_type in f), (loss_type,))


def _families(runs: list[RunData]) -> list[tuple]:
    return list(dict.fromkeys(family(r.loss_type) for r in sorted(runs, key=run_order)))


def _margin(run: RunData, rec: dict) -> float:
    """The logged margin, divided by β for a loss that multiplies its log-ratios by β."""
    m = _num(rec.get("margin"))
    if run.beta_free:
        return m
    return m / run.beta if run.beta > 0 else math.nan


def _loss_scale(run: RunData) -> float:
    first = next((_num(r.get("loss")) for r in run.steps if not math.isnan(_num(r.get("loss")))), math.nan)
    return abs(first) if first and not math.isnan(first) else math.nan


def _curve_series(run: RunData, color: int, get) -> list[Series]:
    """The train curve (smoothed) and the eval curve (dashed, same colour) of one metric, when it has values."""
    out = []
    xs, ys = [r["step"] for r in run.steps], [get(r) for r in run.steps]
    if any(not math.isnan(y) for y in ys):
        out.append(Series(run.name, xs, _smooth(ys, max(1, len(xs) // 10)), color,
                          marker="o" if len(xs) <= 20 else None))
    xs, ys = [r["step"] for r in run.evals], [get(r) for r in run.evals]
    if any(not math.isnan(y) for y in ys):
        out.append(Series(f"{run.name} (eval)", xs, ys, color, dashed=True, marker="o"))
    return out


def curve_panels(runs: list[RunData]) -> list[list[Panel]]:
    """curves.png as data: rows loss / step-1 loss, accuracy, margin (/β); one column per loss family."""
    runs = sorted(runs, key=run_order)
    color = {r.name: i for i, r in enumerate(runs)}
    columns = []
    for fam in _families(runs):
        members = [r for r in runs if r.loss_type in fam]
        acc_label = next((ACC_KIND[lt][1] for lt in fam if lt in ACC_KIND), "accuracy")
        margin_label = next((MARGIN_LABEL[lt] for lt in fam if lt in MARGIN_LABEL),
                            "margin" if all(r.beta_free for r in members) else "margin / β")
        loss = Panel(", ".join(fam), "loss ÷ its step-1 value")
        acc = Panel("", acc_label, chance=True)
        margin = Panel("", margin_label)
        for r in members:
            scale = _loss_scale(r)
            loss.series += _curve_series(r, color[r.name], lambda rec, s=scale: _num(rec.get("loss")) / s)
            acc.series += _curve_series(r, color[r.name], lambda rec: _num(rec.get("acc")))
            margin.series += _curve_series(r, color[r.name], lambda rec, r=r: _margin(r, rec))
        columns.append([loss, acc, margin])
    return [list(row) for row in zip(*columns)]


def _beta_lines(runs: list[RunData], get, best: RunData | None) -> list[Series]:
    """One line per loss type against β (a horizontal dashed line for a loss without β), best run starred."""
    out = []
    loss_types = list(dict.fromkeys(r.loss_type for r in sorted(runs, key=run_order)))
    for lt in loss_types:
        color = LOSS_TYPES.index(lt) if lt in LOSS_TYPES else len(LOSS_TYPES) + loss_types.index(lt)
        group = [r for r in sorted(runs, key=run_order) if r.loss_type == lt]
        pts = [(r.beta, get(r)) for r in group if not math.isnan(get(r))]
        if not pts:
            continue
        if group[0].beta_free:
            out.append(Series(f"{lt} (no β)", [], [pts[0][1]], color, dashed=True, horizontal=True))
            continue
        out.append(Series(lt, [x for x, _ in pts], [y for _, y in pts], color, marker="o"))
        if best in group and not math.isnan(get(best)):
            out.append(Series("_best", [best.beta], [get(best)], color, marker="*"))
    return out


def _train_value(runs: list[RunData]):
    """Where a family's β panels take acc and margin from: the last in-training eval if every run has one."""
    if all(r.last_eval is not None for r in runs):
        return "last in-training eval", lambda r: r.last_eval
    return "last train step", lambda r: r.final


def beta_panels(runs: list[RunData], reference: dict | None, best: RunData | None) -> list[list[Panel]]:
    """beta.png as data: held-out and downstream accuracy for all runs, then per β-using family acc and margin / β
    against β."""
    betas = sorted({r.beta for r in runs if not r.beta_free})
    top = []
    if any(r.pref for r in runs):
        top.append(Panel(HELD_OUT, "accuracy", "β", _beta_lines(runs, lambda r: _num((r.pref or {}).get("acc")), best),
                         chance=True, xticks=betas))
    if any(r.gen for r in runs):
        p = Panel(DOWNSTREAM, "accuracy", "β",
                  _beta_lines(runs, lambda r: _num((r.gen or {}).get("accuracy")), best), xticks=betas)
        if reference is not None:
            p.series.append(Series("SFT model", [], [reference["accuracy"]], "black", dashed=True, horizontal=True))
        top.append(p)
    accs, margins = [], []
    for fam in _families(runs):
        members = [r for r in runs if r.loss_type in fam and not r.beta_free]
        if not members:
            continue
        source, rec = _train_value(members)
        lt = members[0].loss_type
        accs.append(Panel(f"{', '.join(fam)}: {source}", ACC_KIND.get(lt, ("", "accuracy"))[1], "β",
                          _beta_lines(members, lambda r, rec=rec: _num(rec(r).get("acc")), best), chance=True, xticks=betas))
        margins.append(Panel(f"{', '.join(fam)}: {source}", MARGIN_LABEL.get(lt, "margin / β"), "β",
                             _beta_lines(members, lambda r, rec=rec: _margin(r, rec(r)), best), xticks=betas))
    rows = [row for row in (top, accs, margins) if row]
    if not rows:
        return [[None]]  # only losses without β and no held-out evaluation: nothing to plot against β
    width = max(len(row) for row in rows)
    return [row + [None] * (width - len(row)) for row in rows]


# ---------------------------------------------------------------- plots: drawing

def _colour(c, n: int):
    import matplotlib.pyplot as plt

    if isinstance(c, str):
        return c
    return f"C{c}" if n <= 10 else plt.get_cmap("tab20")(c % 20)


def draw(grid: list[list[Panel | None]], title: str, path: Path):
    """Draw the panels into `path` (a PNG, written atomically) and return the closed matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows, ncols = len(grid), max(len(row) for row in grid)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.4 * nrows), squeeze=False)
    n = 1 + max((s.color for row in grid for p in row if p for s in p.series if isinstance(s.color, int)),
                default=0)
    for row, ax_row in zip(grid, axes):
        for panel, ax in zip(row + [None] * (ncols - len(row)), ax_row):
            if panel is None or not panel.series:
                fig.delaxes(ax)
                continue
            _draw_panel(ax, panel, n)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return fig


def _draw_panel(ax, panel: Panel, n: int):
    for s in panel.series:
        style = dict(color=_colour(s.color, n), linestyle="--" if s.dashed else "-", label=s.label)
        if s.horizontal:
            ax.axhline(s.ys[0], **style)
        elif s.marker == "*":
            ax.plot(s.xs, s.ys, marker="*", markersize=16, color=style["color"], linestyle="none", label=s.label)
        else:
            ax.plot(s.xs, s.ys, marker=s.marker, markersize=3, linewidth=1.4, **style)
    if panel.chance:
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="_chance")
    if panel.xticks:
        if len(panel.xticks) > 1 and panel.xticks[0] > 0:
            ax.set_xscale("log")
            ax.minorticks_off()
        ax.set_xticks(panel.xticks, [f"{b:g}" for b in panel.xticks])
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path):
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot_curves(runs: list[RunData], path: Path):
    """Write curves.png; return the figure (its axes are the non-empty panels of `curve_panels`)."""
    return draw(curve_panels(runs), "Training curves (solid: train, moving average over a tenth of the run; "
                "dashed: in-training eval)", path)


def plot_beta(runs: list[RunData], reference: dict | None, path: Path, ranking: Ranking | None = None):
    """Write beta.png; return the figure."""
    ranking = ranking or rank(runs)
    return draw(beta_panels(runs, reference, ranking.best), _headline(ranking), path)


# ---------------------------------------------------------------- summary.md

def _fmt(x, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def _headline(ranking: Ranking) -> str:
    value = f"{ranking.basis} {_fmt(ranking.value, pct=True)}"
    if ranking.best is not None:
        return f"Best run: {ranking.best.name} ({value})"
    if ranking.tied:
        return f"No single best run (tie between {', '.join(r.name for r in ranking.tied)} at {value})"
    return "No single best run (no run has an accuracy to rank on)"


def _headline_markdown(ranking: Ranking, reference: dict | None) -> list[str]:
    best = ranking.best
    if best is None:
        return [f"**{_headline(ranking)}**.", ""]
    line = f"**Best run: {best.name}** ({ranking.basis} {_fmt(ranking.value, pct=True)}"
    if reference is not None and ranking.basis == DOWNSTREAM:
        gain = best.gen["accuracy"] - reference["accuracy"]
        line += f"; the SFT model scores {_fmt(reference['accuracy'], pct=True)}, a change of {100 * gain:+.1f} points"
    return [line + ").", ""]


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
        head += ["held-out acc", "held-out margin"]
    if has_gen:
        head += ["downstream acc", "correct / n"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if reference is not None and has_gen:
        row = ["SFT model (reference)", "–", "–", "0", "–", "–", "–"] + ["–", "–"] * (has_eval + has_pref)
        row += [_fmt(reference["accuracy"], pct=True), f"{reference['correct']} / {reference['n']}"]
        lines.append("| " + " | ".join(row) + " |")
    for r in ranking.pool + ranking.others:
        lines.append("| " + " | ".join(_table_row(r, ranking, has_eval, has_pref, has_gen)) + " |")
    lines += ["", "Final values are from the last training step (one global batch); eval values from the last "
              "in-training evaluation. Each loss logs its own accuracy (see the report's docstring).",
              "", "Plots: `curves.png` (loss ÷ its step-1 value, accuracy and margin / β against step, one column "
              "per loss family; dashed: in-training eval), `beta.png` (held-out, downstream and training metrics "
              "against β).", ""]
    return "\n".join(lines)


def _table_row(r: RunData, ranking: Ranking, has_eval: bool, has_pref: bool, has_gen: bool) -> list[str]:
    name = f"**{r.name}** ★" if r is ranking.best else (f"{r.name} (tie)" if r in ranking.tied else r.name)
    row = [name, r.loss_type, "–" if r.beta_free else f"{r.beta:g}", str(len(r.steps)),
           _fmt(_num(r.final.get("loss"))), _fmt(_num(r.final.get("acc"))), _fmt(_num(r.final.get("margin")))]
    if has_eval:
        ev = r.last_eval or {}
        row += [_fmt(_num(ev.get("acc"))), _fmt(_num(ev.get("margin")))]
    if has_pref:
        row += [_fmt(r.pref["acc"], pct=True), _fmt(r.pref["margin"])] if r.pref else ["–", "–"]
    if has_gen:
        row += [_fmt(r.gen["accuracy"], pct=True), f"{r.gen['correct']} / {r.gen['n']}"] if r.gen else ["–", "–"]
    return row


def write_report(runs_dir: str | Path, only: list[str] | None = None) -> dict:
    """Write curves.png, beta.png and summary.md into RUNS_DIR; return their paths and the ranking.

    `best` is the winning run's name, or None on a tie at the top (or when no run has an accuracy); `basis` names
    the number ranked on and `value` is the top value (a float, nan when nothing was ranked); `tied` lists the
    runs sharing it. `only` names the run directories to include (the pipeline passes its own runs, so that runs
    left in RUNS_DIR by an earlier, different config do not appear); `prefpipe report` includes every run."""
    d = RunsDir(runs_dir)
    runs, reference = load_runs(d.path, only)
    ranking = rank(runs)
    plot_curves(runs, d.report_file("curves"))
    plot_beta(runs, reference, d.report_file("beta"), ranking)
    text = summary_markdown(runs, reference, ranking)
    atomic_write_text(d.report_file("summary"), text)
    return {**{k: str(d.report_file(k)) for k in ("curves", "beta", "summary")},
            "best": ranking.best.name if ranking.best else None, "basis": ranking.basis, "value": ranking.value,
            "tied": [r.name for r in ranking.tied], "headline": _headline(ranking), "markdown": text}
