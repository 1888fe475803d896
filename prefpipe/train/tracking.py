"""Run tracking: `--report_to tensorboard|wandb|none` mirrors metrics.jsonl into TensorBoard and/or W&B.

`open_trackers(...)` is called once per run (one `<loss>-beta<beta>` directory); `Tracker.log(record)` takes the
metrics.jsonl records unchanged. Decisions a user may want to know:

- Each numeric value of a record becomes the scalar `<split>/<key>` (`train/loss`, `eval/acc`, ...) at
  `record["step"]`, the optimizer step of metrics.jsonl. `null` metrics (nothing to average) are left out rather
  than written as 0 or NaN. `split` and `step` themselves are not metrics.
- TensorBoard: event files under `<run>/tensorboard/`, so `tensorboard --logdir RUNS_DIR` shows every run of a
  sweep side by side. The resolved config (the run's `train_config.json`) is written twice: as HParams (nested keys
  flattened to `optim.lr`; null settings left out, lists and booleans as JSON text) so the HParams dashboard
  compares the runs of a sweep, and as the text `config` holding the whole JSON. A run continued with `--resume`
  after step N hides the events a killed run wrote past step N, as metrics.jsonl drops those lines.
- W&B: one W&B run per prefpipe run, named after it, in project `$WANDB_PROJECT` (default `prefpipe`) and group
  `$WANDB_RUN_GROUP` (default: the `group` the caller passes), with the resolved config (nested). Its files go
  under `<run>/wandb/`. `WANDB_MODE=offline` writes only there (upload later with `wandb sync`); otherwise W&B
  needs `wandb login`. A `--resume` starts a new W&B run that continues at step N+1.
- Only the leader process writes; every process checks the names, so a bad `--report_to` stops all of them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from prefpipe.errors import UserError

REPORT_TO_CHOICES = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"
WANDB_DEFAULT_PROJECT = "prefpipe"

# the package to find, and what to install when it is missing
_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
# the HParams table shows these as columns; a metric a loss never logs (sft has no acc) stays empty
_HPARAM_METRICS = ("train/loss", "train/acc", "train/margin", "eval/loss", "eval/acc", "eval/margin")


def parse_report_to(report_to) -> tuple[str, ...]:
    """`--report_to` values (repeated options, or one comma-separated string from a config file) as a tuple:
    `("none",)` or a duplicate-free selection of tensorboard, wandb in the order given."""
    if isinstance(report_to, str):
        report_to = report_to.split(",")
    names = tuple(dict.fromkeys(n.strip() for n in (report_to or ()) if n.strip())) or ("none",)
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise UserError(f"unknown --report_to {unknown[0]!r}; choose {', '.join(REPORT_TO_CHOICES)} (tensorboard "
                        "and wandb may be given together)")
    if "none" in names and len(names) > 1:
        raise UserError(f"--report_to none cannot be combined with {', '.join(n for n in names if n != 'none')}")
    return names


def check_installed(names: tuple[str, ...]) -> None:
    """Fail before any training when a requested tracker's package is missing."""
    for name in names:
        if name in _PACKAGES:
            module, install = _PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise UserError(f"--report_to {name} needs the {module} package: {install} "
                                "(or pip install 'prefpipe[track]')")


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested dicts to dotted keys: {"optim": {"lr": 1e-6}} -> {"optim.lr": 1e-6}."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def scalars(record: dict) -> dict[str, float]:
    """The `<split>/<key>` scalars of one metrics.jsonl record: numbers only, nulls and booleans left out."""
    split = record["split"]
    return {f"{split}/{k}": float(v) for k, v in record.items()
            if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """Fans each record out to the open sinks; with none (`--report_to none`, or not the leader) it does nothing."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, record: dict) -> None:
        if not self.sinks:
            return
        values = scalars(record)
        for sink in self.sinks:
            sink.log(values, int(record["step"]))

    def close(self, failed: bool = False) -> None:
        """Flush and close every sink (a second call does nothing); `failed` marks the run as crashed."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(failed)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(failed=exc_type is not None)


def open_trackers(report_to, run_dir: Path, run_name: str, config: dict, *, leader: bool = True,
                  start_step: int = 0, group: str | None = None) -> Tracker:
    """Open the trackers of one run. `config` is `TrainConfig.resolved(loss)`; `start_step` is the step a
    `--resume` continues after (0 for a fresh run)."""
    names = parse_report_to(report_to)
    check_installed(names)
    if not leader:
        return Tracker([])
    sinks = []
    try:
        for name in names:
            if name == "tensorboard":
                sinks.append(_TensorBoard(Path(run_dir) / TENSORBOARD_DIR, config, start_step))
            elif name == "wandb":
                sinks.append(_WandB(Path(run_dir), run_name, config, group))
    except BaseException:
        Tracker(sinks).close(failed=True)
        raise
    return Tracker(sinks)


def _hparam_value(value):
    """A value the HParams plugin stores: numbers and text as they are, anything else (lists, booleans) as JSON."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return value if isinstance(value, str) else json.dumps(value)


class _TensorBoard:
    def __init__(self, log_dir: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard hides what a killed run logged after the checkpoint being resumed
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step > 0 else None,
                                    flush_secs=10)
        hp = {k: _hparam_value(v) for k, v in flatten(config).items() if v is not None}
        experiment, start, _ = hparams(hp, dict.fromkeys(_HPARAM_METRICS, 0.0))
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)
        text = json.dumps(config, indent=2, sort_keys=True)
        # four-space indent: a Markdown code block in TensorBoard's text tab
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def log(self, values: dict, step: int):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self, failed: bool):
        self.writer.file_writer.add_summary(_session_end(failed))
        self.writer.close()


def _session_end(failed: bool):
    """The HParams session-end summary, with the run's outcome (torch's `hparams()` always says success)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    status = api_pb2.Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS")
    content = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(status=status),
                                                version=metadata.PLUGIN_DATA_VERSION)
    smd = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                 content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=smd)])


class _WandB:
    def __init__(self, run_dir: Path, run_name: str, config: dict, group: str | None):
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            # create_new: leave alone any W&B run the caller has open (a notebook, an outer sweep)
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT,
                                  group=os.environ.get("WANDB_RUN_GROUP") or group, name=run_name,
                                  dir=str(run_dir), config=config, reinit="create_new")
        except wandb.errors.Error as e:
            raise UserError(f"--report_to wandb: W&B did not start ({str(e).splitlines()[0]}); run `wandb login`, "
                            "or set WANDB_MODE=offline to write the run only locally") from e

    def log(self, values: dict, step: int):
        self.run.log(values, step=step)

    def close(self, failed: bool):
        self.run.finish(exit_code=1 if failed else 0)
