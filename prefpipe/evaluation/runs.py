"""What `prefpipe report` reads from a RUNS_DIR, as one `RunData` per run (file names from `prefpipe.rundir`), and
the names of what each loss logs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from prefpipe.errors import UserError
from prefpipe.rundir import RunsDir
from prefpipe.train.registry import LOSS_TYPES, LOSSES

DOWNSTREAM, HELD_OUT = "downstream accuracy", "held-out reward accuracy"


@dataclass(frozen=True)
class Meaning:
    """What a loss's logged `acc` and `margin` mean, from its registry entry: `kind` names the ranking basis, the
    labels are axis labels. Runs whose losses mean the same share a ranking level and a column of the plots."""
    kind: str
    acc_label: str
    margin_label: str


def meaning(loss_type: str) -> Meaning:
    try:
        s = LOSSES[loss_type]
    except KeyError:  # a run of a loss this prefpipe does not know
        return Meaning(f"{loss_type} accuracy", "accuracy", "margin")
    return Meaning(s.acc_kind or f"{loss_type} (no accuracy)", s.acc_label or "accuracy",
                   s.margin_label or "margin")


# The ranking order of the in-training bases: the registry's order of first appearance.
KINDS = tuple(dict.fromkeys(meaning(lt).kind for lt in LOSS_TYPES))


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
    verdicts: dict | None = None  # eval_gen.jsonl: question row -> answered right

    @property
    def beta_free(self) -> bool:
        try:
            return not LOSSES[self.loss_type].uses_beta
        except KeyError:  # a run of a loss this prefpipe does not know
            return False

    @property
    def last_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else self.result_eval


def num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else math.nan


def run_order(run: RunData) -> tuple:
    """Loss type in LOSS_TYPES order (others after, by name), then β as a number, then name."""
    lt = run.loss_type
    return (LOSS_TYPES.index(lt) if lt in LOSS_TYPES else len(LOSS_TYPES), lt, run.beta, run.name)


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e})", file=str(path))


def _read_jsonl(path: Path):
    """(line number, object) for every non-blank line of `path`."""
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            raise UserError("not valid JSON", file=str(path), row=n)


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of one metrics.jsonl."""
    if not path.exists():
        return [], []
    train, evals = [], []
    for _, rec in _read_jsonl(path):
        split = rec.get("split", "train")
        if split == "train":
            train.append(rec)
        elif split == "eval":
            evals.append(rec)
    return train, evals


def _read_verdicts(path: Path) -> dict | None:
    """Question row -> right, from eval_gen.jsonl; None when the file is missing or holds no verdicts."""
    if not path.exists():
        return None
    out = {}
    for n, rec in _read_jsonl(path):
        if not isinstance(rec, dict) or "row" not in rec or not isinstance(rec.get("correct"), bool):
            raise UserError("expected an object with \"row\" and a true/false \"correct\"", file=str(path), row=n)
        out[json.dumps(rec["row"])] = rec["correct"]
    return out or None


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
        gen = _read_json(sub.eval_gen)
        runs.append(RunData(result.get("name", sub.name), result.get("loss_type", "?"), float(result.get("beta", 0)),
                            train, result.get("final") or {}, gen, _read_json(sub.eval_pref),
                            evals, result.get("eval") or None,
                            _read_verdicts(sub.eval_gen_rows) if gen is not None else None))
    if not runs:
        raise UserError("no training runs here (expected <run>/result.json from prefpipe train)", file=str(d.path))
    return runs, _read_json(d.reference.eval_gen)
