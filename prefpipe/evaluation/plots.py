"""curves.png and beta.png: first as data (`curve_panels`, `beta_panels`: every panel with its lines), then drawn.

What each panel shows is in the module docstring of prefpipe.evaluation.report. Only panels with at least one line
of data are built, so no figure has an empty panel. Missing values (a KTO step whose batch held only desirable or
only undesirable examples has no margin) are left out of a line, which joins its neighbours across them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from prefpipe.evaluation.ranking import Ranking, headline, rank
from prefpipe.fileio import atomic_write_with
from prefpipe.evaluation.runs import DOWNSTREAM, HELD_OUT, RunData, meaning, num, run_order
from prefpipe.train.registry import LOSS_TYPES


@dataclass
class Series:
    label: str
    xs: list
    ys: list
    color: int | str  # an index into the run colours, or a matplotlib colour
    dashed: bool = False  # in-training evaluation, or a loss without β drawn as a horizontal line
    marker: str | None = None
    horizontal: bool = False  # a value that does not depend on x (drawn across the panel at ys[0])
    window: int = 1  # a train curve: each point is the mean of the last `window` steps


@dataclass
class Panel:
    title: str
    ylabel: str
    xlabel: str = "step"
    series: list = field(default_factory=list)
    chance: bool = False  # draw the 0.5 line of a coin flip
    xticks: list | None = None  # β values (log scale when there are several)


def _families(runs: list[RunData]) -> list[tuple]:
    """The runs' loss types grouped by what their accuracy and margin mean (`runs.meaning`), in run order."""
    groups: dict = {}
    for r in sorted(runs, key=run_order):
        groups.setdefault(meaning(r.loss_type), []).append(r.loss_type)
    return [tuple(dict.fromkeys(g)) for g in groups.values()]


def smooth(ys: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values, skipping missing ones (nan when all are missing)."""
    out, vals = [], []
    for y in ys:
        vals.append(y)
        if len(vals) > window:
            vals.pop(0)
        finite = [v for v in vals if not math.isnan(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def smoothing_window(n_steps: int) -> int:
    """A tenth of the run, in steps (1, no smoothing, for runs under 20 steps)."""
    return max(1, n_steps // 10)


def _present(xs: list, ys: list) -> tuple[list, list]:
    """The points that have a value."""
    kept = [(x, y) for x, y in zip(xs, ys) if not math.isnan(y)]
    return [x for x, _ in kept], [y for _, y in kept]


def _margin(run: RunData, rec: dict) -> float:
    """The logged margin, divided by β for a loss that multiplies its log-ratios by β."""
    m = num(rec.get("margin"))
    if run.beta_free:
        return m
    return m / run.beta if run.beta > 0 else math.nan


def _loss_scale(run: RunData) -> float:
    first = next((num(r.get("loss")) for r in run.steps if not math.isnan(num(r.get("loss")))), math.nan)
    return abs(first) if first and not math.isnan(first) else math.nan


def _curve_series(run: RunData, color: int, get) -> list[Series]:
    """The train curve (smoothed) and the eval curve (dashed, same colour) of one metric, when it has values."""
    out = []
    window = smoothing_window(len(run.steps))
    xs, ys = _present([r["step"] for r in run.steps], smooth([get(r) for r in run.steps], window))
    if xs:
        out.append(Series(run.name, xs, ys, color, marker="o" if len(run.steps) <= 20 else None, window=window))
    xs, ys = _present([r["step"] for r in run.evals], [get(r) for r in run.evals])
    if xs:
        out.append(Series(f"{run.name} (eval)", xs, ys, color, dashed=True, marker="o"))
    return out


def curve_panels(runs: list[RunData]) -> list[list[Panel | None]]:
    """curves.png as data: rows loss / step-1 loss, accuracy, margin (/β); one column per loss family; None where a
    family has nothing for that row."""
    runs = sorted(runs, key=run_order)
    color = {r.name: i for i, r in enumerate(runs)}
    columns = []
    for fam in _families(runs):
        members = [r for r in runs if r.loss_type in fam]
        acc_label, margin_label = meaning(fam[0]).acc_label, meaning(fam[0]).margin_label
        loss = Panel(", ".join(fam), "loss ÷ its step-1 value")
        acc = Panel("", acc_label, chance=True)
        margin = Panel("", margin_label)
        for r in members:
            scale = _loss_scale(r)
            loss.series += _curve_series(r, color[r.name], lambda rec, s=scale: num(rec.get("loss")) / s)
            acc.series += _curve_series(r, color[r.name], lambda rec: num(rec.get("acc")))
            margin.series += _curve_series(r, color[r.name], lambda rec, r=r: _margin(r, rec))
        columns.append([p if p.series else None for p in (loss, acc, margin)])
    rows = [list(row) for row in zip(*columns)]
    return [row for row in rows if any(row)]


def curves_title(grid: list[list[Panel | None]]) -> str:
    """The title of curves.png, naming the smoothing the train curves actually got."""
    windows = sorted({s.window for row in grid for p in row if p for s in p.series if not s.dashed})
    if windows == [1] or not windows:
        how = "every step, unsmoothed"
    elif len(windows) == 1:
        how = f"mean of the last {windows[0]} steps"
    else:
        how = f"mean of the last {windows[0]}–{windows[-1]} steps (a tenth of each run)"
    return f"Training curves (solid: train, {how}; dashed: in-training eval)"


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
    against β. Only panels with a line; [] when there is none."""
    betas = sorted({r.beta for r in runs if not r.beta_free})
    top = [Panel(HELD_OUT, "accuracy", "β", _beta_lines(runs, lambda r: num((r.pref or {}).get("acc")), best),
                 chance=True, xticks=betas)]
    down = Panel(DOWNSTREAM, "accuracy", "β", _beta_lines(runs, lambda r: num((r.gen or {}).get("accuracy")), best),
                 xticks=betas)
    if reference is not None and down.series:
        down.series.append(Series("SFT model", [], [reference["accuracy"]], "black", dashed=True, horizontal=True))
    top.append(down)
    accs, margins = [], []
    for fam in _families(runs):
        members = [r for r in runs if r.loss_type in fam and not r.beta_free]
        if not members:
            continue
        source, rec = _train_value(members)
        lt = members[0].loss_type
        accs.append(Panel(f"{', '.join(fam)}: {source}", meaning(lt).acc_label, "β",
                          _beta_lines(members, lambda r, rec=rec: num(rec(r).get("acc")), best), chance=True, xticks=betas))
        margins.append(Panel(f"{', '.join(fam)}: {source}", meaning(lt).margin_label, "β",
                             _beta_lines(members, lambda r, rec=rec: _margin(r, rec(r)), best), xticks=betas))
    rows = [[p for p in row if p.series] for row in (top, accs, margins)]
    return [row for row in rows if row]


# ---------------------------------------------------------------- drawing

def _colour(c, n: int):
    import matplotlib.pyplot as plt

    if isinstance(c, str):
        return c
    return f"C{c}" if n <= 10 else plt.get_cmap("tab20")(c % 20)


def draw(grid: list[list[Panel | None]], title: str, path: Path, empty_note: str = ""):
    """Draw the panels into `path` (a PNG, written atomically) and return the closed matplotlib figure. A grid
    without panels gives a figure that says `empty_note` instead."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not grid:
        fig = plt.figure(figsize=(6.4, 1.6))
        fig.text(0.5, 0.5, empty_note, ha="center", va="center", wrap=True)
        fig.suptitle(title)
        _save(fig, path)
        plt.close(fig)
        return fig
    nrows, ncols = len(grid), max(len(row) for row in grid)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols, 3.4 * nrows), squeeze=False)
    n = 1 + max((s.color for row in grid for p in row if p for s in p.series if isinstance(s.color, int)),
                default=0)
    for row, ax_row in zip(grid, axes):
        for panel, ax in zip(row + [None] * (ncols - len(row)), ax_row):
            if panel is None:
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
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def plot_curves(runs: list[RunData], path: Path):
    """Write curves.png; return the figure (its axes are the panels of `curve_panels`)."""
    grid = curve_panels(runs)
    return draw(grid, curves_title(grid), path, "no run logged a training step")


def plot_beta(runs: list[RunData], reference: dict | None, path: Path, ranking: Ranking | None = None):
    """Write beta.png; return the figure."""
    import textwrap

    ranking = ranking or rank(runs)
    grid = beta_panels(runs, reference, ranking.best)
    width = max(70, 45 * max((len(row) for row in grid), default=1))  # the headline, in lines the figure can hold
    return draw(grid, textwrap.fill(headline(ranking), width), path,
                "nothing to plot against β: no run uses β and none has a held-out or downstream evaluation")
