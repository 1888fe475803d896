"""`prefpipe report RUNS_DIR`: plots and a markdown table that show which beta won.

Reads what training and evaluation left in RUNS_DIR: `<run>/result.json`, `<run>/metrics.jsonl`, and when present
`<run>/eval_gen.json`, `<run>/eval_pref.json` and the SFT model's own `reference/eval_gen.json`. Writes:

- `curves.png`: training loss, reward accuracy and margin against step, every run on shared axes (a moving
  average over a tenth of the run, so the lines can be told apart; sft runs have no acc or margin);
- `beta.png`: final reward accuracy and margin, held-out reward accuracy and downstream accuracy against beta, one
  line per loss type. Losses without a beta (orpo, sft) and the SFT model are horizontal lines;
- `summary.md`: one row per run, best first, with the winner named above the table.

The winner is the run with the highest downstream accuracy when there is one, else the highest held-out reward
accuracy, else the highest final training reward accuracy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from prefpipe.errors import UserError
from prefpipe.fileio import atomic_write_text
from prefpipe.rundir import RunsDir
from prefpipe.train.loss_names import REFERENCE_FREE  # these losses do not use beta either

@dataclass
class RunData:
    name: str
    loss_type: str
    beta: float
    steps: list = field(default_factory=list)  # train records from metrics.jsonl
    final: dict = field(default_factory=dict)
    gen: dict | None = None
    pref: dict | None = None

    @property
    def beta_free(self) -> bool:
        return self.loss_type in REFERENCE_FREE


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e})", file=str(path))


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError("not valid JSON", file=str(path), row=n)
        if rec.get("split", "train") == "train":
            out.append(rec)
    return out


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
        runs.append(RunData(result.get("name", sub.name), result.get("loss_type", "?"), float(result.get("beta", 0)),
                            _read_metrics(sub.metrics), result.get("final") or {},
                            _read_json(sub.eval_gen), _read_json(sub.eval_pref)))
    if not runs:
        raise UserError("no training runs here (expected <run>/result.json from prefpipe train)", file=str(d.path))
    return runs, _read_json(d.reference.eval_gen)


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.nan


def _smooth(ys: list[float], window: int) -> list[float]:
    out, acc, vals = [], 0.0, []
    for y in ys:
        vals.append(y)
        if len(vals) > window:
            vals.pop(0)
        finite = [v for v in vals if not math.isnan(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def score(run: RunData) -> tuple[str, float]:
    """(what the winner is judged on, value) for one run."""
    if run.gen is not None:
        return "downstream accuracy", run.gen["accuracy"]
    if run.pref is not None:
        return "held-out reward accuracy", run.pref["acc"]
    return "final reward accuracy", _num(run.final.get("acc"))


def winner(runs: list[RunData]) -> RunData:
    basis = {score(r)[0] for r in runs}
    # A run without the shared basis (a run never evaluated) cannot win against ones that were.
    for b in ("downstream accuracy", "held-out reward accuracy", "final reward accuracy"):
        if b in basis:
            pool = [r for r in runs if score(r)[0] == b and not math.isnan(score(r)[1])]
            if pool:
                return max(pool, key=lambda r: score(r)[1])
    return runs[0]


def plot_curves(runs: list[RunData], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for run in runs:
        if not run.steps:
            continue
        xs = [r["step"] for r in run.steps]
        window = max(1, len(xs) // 10)
        for ax, key in zip(axes, ("loss", "acc", "margin")):
            ys = [_num(r.get(key)) for r in run.steps]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(xs, _smooth(ys, window), label=run.name, linewidth=1.4,
                    linestyle="--" if run.beta_free else "-", marker="o" if len(xs) <= 20 else None,
                    markersize=3)
    for ax, label in zip(axes, ("loss", "reward accuracy", "reward margin")):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    axes[-1].set_xlabel("step")
    axes[0].legend(fontsize=8, ncol=2)
    axes[0].set_title("Training curves (moving average over a tenth of each run)")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path):
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot_beta(runs: list[RunData], reference: dict | None, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("final reward accuracy", lambda r: _num(r.final.get("acc"))),
              ("final reward margin", lambda r: _num(r.final.get("margin")))]
    if any(r.pref for r in runs):
        panels.append(("held-out reward accuracy", lambda r: r.pref["acc"] if r.pref else math.nan))
    if any(r.gen for r in runs):
        panels.append(("downstream accuracy", lambda r: r.gen["accuracy"] if r.gen else math.nan))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    axes = axes[0]
    betas = sorted({r.beta for r in runs if not r.beta_free})
    best = winner(runs)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    loss_types = list(dict.fromkeys(r.loss_type for r in runs))
    for ax, (title, get) in zip(axes, panels):
        for i, lt in enumerate(loss_types):
            group = sorted((r for r in runs if r.loss_type == lt), key=lambda r: r.beta)
            color = colors[i % len(colors)]
            if group[0].beta_free:
                y = get(group[0])
                if not math.isnan(y):
                    ax.axhline(y, color=color, linestyle="--", label=f"{lt} (no β)")
                continue
            xs = [r.beta for r in group]
            ys = [get(r) for r in group]
            ax.plot(xs, ys, marker="o", color=color, label=lt)
            if best in group:
                ax.plot([best.beta], [get(best)], marker="*", markersize=16, color=color, linestyle="none")
        if title == "downstream accuracy" and reference is not None:
            ax.axhline(reference["accuracy"], color="black", linestyle=":", label="SFT model")
        if betas and len(betas) > 1:
            ax.set_xscale("log")
            ax.minorticks_off()
        if betas:
            ax.set_xticks(betas, [f"{b:g}" for b in betas])
        ax.set_xlabel("β")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"Best: {best.name} ({score(best)[0]} {_fmt(score(best)[1])})")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _fmt(x, pct=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3f}"


def summary_markdown(runs: list[RunData], reference: dict | None) -> str:
    best = winner(runs)
    basis, value = score(best)
    ordered = sorted(runs, key=lambda r: (-score(r)[1] if not math.isnan(score(r)[1]) else math.inf))
    lines = ["# prefpipe report", ""]
    line = f"**Best run: {best.name}** ({basis} {_fmt(value, pct=True)}"
    if reference is not None and best.gen is not None:
        gain = best.gen["accuracy"] - reference["accuracy"]
        line += f"; the SFT model scores {_fmt(reference['accuracy'], pct=True)}, a change of {100 * gain:+.1f} points"
    lines += [line + ").", ""]
    head = ["run", "loss", "β", "steps", "final loss", "final acc", "final margin"]
    has_pref, has_gen = any(r.pref for r in runs), any(r.gen for r in runs)
    if has_pref:
        head += ["held-out acc", "held-out margin"]
    if has_gen:
        head += ["downstream acc", "correct / n"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if reference is not None and has_gen:
        row = ["SFT model (reference)", "–", "–", "0", "–", "–", "–"] + (["–", "–"] if has_pref else [])
        row += [_fmt(reference["accuracy"], pct=True), f"{reference['correct']} / {reference['n']}"]
        lines.append("| " + " | ".join(row) + " |")
    for r in ordered:
        name = f"**{r.name}** ★" if r is best else r.name
        row = [name, r.loss_type, "–" if r.beta_free else f"{r.beta:g}", str(len(r.steps)),
               _fmt(_num(r.final.get("loss"))), _fmt(_num(r.final.get("acc"))), _fmt(_num(r.final.get("margin")))]
        if has_pref:
            row += [_fmt(r.pref["acc"], pct=True), _fmt(r.pref["margin"])] if r.pref else ["–", "–"]
        if has_gen:
            row += [_fmt(r.gen["accuracy"], pct=True), f"{r.gen['correct']} / {r.gen['n']}"] if r.gen else ["–", "–"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Plots: `curves.png` (loss, reward accuracy and margin against step), `beta.png` (final and "
              "held-out metrics against β).", ""]
    return "\n".join(lines)


def write_report(runs_dir: str | Path, only: list[str] | None = None) -> dict:
    """Write curves.png, beta.png and summary.md into RUNS_DIR; return their paths and the winner.

    `only` names the run directories to include (the pipeline passes its own runs, so that runs left in RUNS_DIR
    by an earlier, different config do not appear); `prefpipe report` includes every run."""
    d = RunsDir(runs_dir)
    runs, reference = load_runs(d.path, only)
    plot_curves(runs, d.report_file("curves"))
    plot_beta(runs, reference, d.report_file("beta"))
    text = summary_markdown(runs, reference)
    atomic_write_text(d.report_file("summary"), text)
    best = winner(runs)
    return {**{k: str(d.report_file(k)) for k in ("curves", "beta", "summary")},
            "best": best.name, "basis": score(best)[0], "value": score(best)[1], "markdown": text}
