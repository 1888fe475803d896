"""What a pipeline (re)run does with the run directories of its sweep: keep, continue, or replace them.

Before a run trains, the pipeline writes its record, `RUNS_DIR/<run>/pipeline_run.json`: the run's resolved train
settings (what train_config.json holds, less `save_every`, `keep_checkpoints`, `resume` and `overwrite`, which do
not change the trained model) and the identity digest of what it trains from (its cache's, or its data's). On a
rerun each run of the sweep is

- **kept** when it finished (result.json and final/), its record matches and its cache was not rebuilt by this
  pipeline: it is not trained again;
- **continued** when it did not finish and its record matches: `prefpipe train --resume` goes on from its last
  checkpoint (`save_every`) to the weights an uninterrupted run reaches, or starts it over when none was saved;
- **replaced** otherwise: its settings changed (the log names them), it has no record (made by `prefpipe train`
  or an older prefpipe), or its cache was (re)computed now. The directory is removed and the run trained afresh.

Run directories that are not in the sweep are left alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from prefpipe.fileio import atomic_write_text, remove_tree
from prefpipe.rundir import RunDir
from prefpipe.train.checkpoint import latest_checkpoint

# Loop settings that change when checkpoints are written or whether a call may continue, not the trained model.
NOT_OUTCOME = ("save_every", "keep_checkpoints", "resume", "overwrite")


@dataclass
class RunCheck:
    run: RunDir
    action: str  # "train" | "keep" | "continue" | "restart" | "replace"
    reason: str

    def line(self) -> str:
        verb = {"train": "training", "keep": "keeping", "continue": "continuing", "restart": "starting over",
                "replace": "replacing"}[self.action]
        return f"run {self.run.name}: {verb} ({self.reason})"


def record(resolved: dict, source: str) -> dict:
    """The settings a rerun compares: `resolved` (TrainConfig.resolved of the run) and the source's digest."""
    settings = {**resolved, "loop": {k: v for k, v in resolved["loop"].items() if k not in NOT_OUTCOME}}
    return json.loads(json.dumps({"settings": settings, "data_identity": source}))  # as read back: lists, not tuples


def differences(old, new, prefix: str = "") -> list[str]:
    """Dotted names of the settings in which two records differ (`settings.optim.lr`, `data_identity`)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [prefix[:-1]] if old != new else []


def _read_record(rd: RunDir) -> dict | None:
    try:
        rec = json.loads(rd.pipeline_record.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def check_run(rd: RunDir, rec: dict, *, rebuilt: bool) -> RunCheck:
    """What to do with the run directory `rd` for a run whose record is `rec`; `rebuilt`: its cache was
    (re)computed by this pipeline, so a run found there was trained on other bytes."""
    if not rd.path.exists():
        return RunCheck(rd, "train", "no run there yet")
    old = _read_record(rd)
    if old is None:
        return RunCheck(rd, "replace", f"no {rd.pipeline_record.name} says which settings it was trained with")
    diff = [d.removeprefix("settings.") for d in differences(old, rec)]
    if diff:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        return RunCheck(rd, "replace", f"settings changed: {shown}")
    if rebuilt:
        return RunCheck(rd, "replace", "its cache was computed again by this pipeline")
    if rd.result.exists() and rd.final.exists():
        return RunCheck(rd, "keep", "finished with these settings; not trained again")
    ckpt = latest_checkpoint(rd.checkpoints)
    if ckpt is not None:
        return RunCheck(rd, "continue", f"unfinished; from its checkpoint {ckpt.name}")
    return RunCheck(rd, "restart", "unfinished, and no checkpoint was saved (save_every)")


def prepare(checks: list[RunCheck], records: list[dict], log):
    """Log each decision, remove the runs to replace, and write the record of every run about to train."""
    for c, rec in zip(checks, records):
        log(c.line())
        if c.action == "keep":
            continue
        if c.action == "replace":
            remove_tree(c.run.path)
        c.run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(c.run.pipeline_record, json.dumps(rec, indent=2, sort_keys=True))
