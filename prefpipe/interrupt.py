"""What to tell the user after Ctrl-C: where the work stopped and the command that continues it.

The CLI (`prefpipe.cli.Group`) calls `interrupted_message` with the interrupted command's name and its parsed
options. Everything here is read back from the output directories after the interrupt, so the training and
precompute loops need no bookkeeping for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefpipe.errors import UserError
from prefpipe.pipeline.config import KEY_BY_NAME, read_toml
from prefpipe.rundir import RunDir


def interrupted_message(command: str | None, params: dict) -> str:
    """One line for stderr; the caller prefixes `prefpipe: ` and exits with status 130."""
    try:
        if command == "train" and params.get("out"):
            return _train_message(Path(params["out"]))
        if command == "pipeline":
            return "interrupted; rerun the same command to continue: " + _rerun_keeps(_pipeline_runs_dir(params))
        if command == "demo":
            return "interrupted; rerun the same command to continue: " + _rerun_keeps(
                Path(params.get("out") or "prefpipe-demo") / "runs", "the SFT model, the pairs, ")
        if command == "precompute" and params.get("out"):
            return _precompute_message(Path(params["out"]))
    except (OSError, UserError):
        pass  # the directory vanished or is unreadable, or the config is: fall back to the plain message
    return "interrupted"


def _pipeline_runs_dir(params: dict) -> Path:
    """RUNS_DIR of the interrupted pipeline: the option, else the config file's key, else the default."""
    if params.get("runs_dir"):
        return Path(params["runs_dir"])
    given = read_toml(params["config_path"]).get("runs_dir") if params.get("config_path") else None
    return Path(given or KEY_BY_NAME["runs_dir"].default)


def _rerun_keeps(runs_dir: Path, before: str = "") -> str:
    """What a pipeline rerun keeps (see prefpipe.pipeline.reruns), from the runs the pipeline recorded there;
    `before`: what else the command reuses."""
    from prefpipe.train.checkpoint import latest_checkpoint  # torch: this module is imported for every --help

    kept, continued, over = [], [], []
    for p in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        rd = RunDir(p)
        if not rd.pipeline_record.exists():
            continue  # not a pipeline's run
        ckpt = latest_checkpoint(rd.checkpoints)
        if rd.result.exists() and rd.final.exists():
            kept.append(rd.name)
        elif ckpt is not None:
            continued.append(f"{rd.name} continues from its checkpoint {ckpt.name}")
        else:
            over.append(rd.name)
    parts = [f"{before}finished caches and cache parts are reused"]
    parts += [f"finished runs are kept ({', '.join(kept)})"] if kept else []
    parts += continued
    parts += [f"{', '.join(over)} start{'s' if len(over) == 1 else ''} from step 0 (no checkpoint; save_every "
              "saves them)"] if over else []
    return "; ".join(parts) + "; each only while its settings are unchanged (a changed run is trained afresh)"


def _current_run(out: Path) -> RunDir | None:
    """The run that was training: the unfinished run directory whose metrics or checkpoints changed last."""
    if not out.is_dir():
        return None
    best, best_time = None, -1.0
    for p in out.iterdir():
        rd = RunDir(p)
        if not p.is_dir() or rd.result.exists():
            continue
        times = [f.stat().st_mtime for f in (rd.metrics, rd.config, rd.checkpoints) if f.exists()]
        if times and max(times) > best_time:
            best, best_time = rd, max(times)
    return best


def _last_step(rd: RunDir) -> int | None:
    """The step of the last complete line in metrics.jsonl (a line cut by the interrupt is skipped)."""
    if not rd.metrics.exists():
        return None
    for line in reversed(rd.metrics.read_text().splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _train_message(out: Path) -> str:
    from prefpipe.train.checkpoint import latest_checkpoint  # torch: as above

    rd = _current_run(out)
    if rd is None:
        return f"interrupted before any run in {out} started training"
    step = _last_step(rd)
    at = f"interrupted at step {step} of {rd.name}" if step is not None else f"interrupted in {rd.name}"
    ckpt = latest_checkpoint(rd.checkpoints)
    if ckpt is None:
        return (f"{at}; no checkpoint was saved (pass --save_every N to save them); rerun the same command "
                f"with --resume to start this run over (finished runs are kept)")
    return f"{at}; last checkpoint {ckpt}; rerun the same command with --resume to continue from it"


def _precompute_message(out: Path) -> str:
    from prefpipe.data.cache import part_name  # pyarrow: as above

    pattern = part_name(0).replace("00000", "*")
    done = len(list(out.glob(pattern))) if out.is_dir() else 0
    return (f"interrupted; {done} finished part{'s' if done != 1 else ''} kept in {out}; rerun the same command to "
            f"continue from them")
