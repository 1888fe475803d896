"""`--report_to`: what TensorBoard and W&B hold after a run, read back with their own readers (TensorBoard's
EventAccumulator; for W&B's offline `.wandb` file, a small reader of its record log written here), compared with
hand-written records; the name checks; and that `none` and non-leader processes write nothing."""

from __future__ import annotations

import json
import struct
import textwrap
import time

import numpy as np
import pytest

from prefpipe.errors import UserError
from prefpipe.train import tracking
from prefpipe.train.tracking import REPORT_TO_CHOICES, open_trackers, parse_report_to
from prefpipe import rundir

# what the training loop writes to metrics.jsonl: train steps 1-3, evaluations at 2 and 3, a null metric at step 2
RECORDS = [
    {"split": "train", "step": 1, "epoch": 0.25, "loss": 0.6875, "acc": 0.5, "r_chosen": 0.125,
     "grad_norm": 1.5, "lr": 5e-7, "examples": 8, "tokens": 96},
    {"split": "train", "step": 2, "epoch": 0.5, "loss": 0.625, "acc": 0.75, "r_chosen": None,
     "grad_norm": 1.25, "lr": 1e-6, "examples": 8, "tokens": 100},
    {"split": "eval", "step": 2, "loss": 0.65625, "acc": 0.625},
    {"split": "train", "step": 3, "epoch": 0.75, "loss": 0.5, "acc": 1.0, "r_chosen": -0.25,
     "grad_norm": 0.75, "lr": 7.5e-7, "examples": 8, "tokens": 104},
    {"split": "eval", "step": 3, "loss": 0.59375, "acc": 0.875},
]

# the same numbers written out by hand per tag: (step, value)
EXPECTED = {
    "train/epoch": [(1, 0.25), (2, 0.5), (3, 0.75)],
    "train/loss": [(1, 0.6875), (2, 0.625), (3, 0.5)],
    "train/acc": [(1, 0.5), (2, 0.75), (3, 1.0)],
    "train/r_chosen": [(1, 0.125), (3, -0.25)],
    "train/grad_norm": [(1, 1.5), (2, 1.25), (3, 0.75)],
    "train/lr": [(1, 5e-7), (2, 1e-6), (3, 7.5e-7)],
    "train/examples": [(1, 8), (2, 8), (3, 8)],
    "train/tokens": [(1, 96), (2, 100), (3, 104)],
    "eval/loss": [(2, 0.65625), (3, 0.59375)],
    "eval/acc": [(2, 0.625), (3, 0.875)],
}

CONFIG = {"loss": {"loss_type": "dpo", "beta": 0.1, "label_smoothing": 0.0},
          "optim": {"lr": 5e-7, "lr_scheduler": "cosine"},
          "loop": {"batch_size": 8, "max_steps": None, "resume": False},
          "source": {"model": "sft-model", "columns": {"prompt": "question"}},
          "device": "auto", "fsdp": False}


def log_all(tracker, records=RECORDS):
    for r in records:
        tracker.log(r)
    tracker.close()


# ------------------------------------------------------------------ names

def test_report_to_names():
    assert REPORT_TO_CHOICES == ("none", "tensorboard", "wandb")
    assert parse_report_to(()) == ("none",)
    assert parse_report_to(("none",)) == ("none",)
    assert parse_report_to(("wandb", "tensorboard", "wandb")) == ("wandb", "tensorboard")
    assert parse_report_to("tensorboard, wandb") == ("tensorboard", "wandb")  # a config file's string
    with pytest.raises(UserError, match=r"unknown --report_to 'mlflow'; choose none, tensorboard, wandb"):
        parse_report_to(("tensorboard", "mlflow"))
    with pytest.raises(UserError, match="none cannot be combined with wandb"):
        parse_report_to(("none", "wandb"))
    with pytest.raises(UserError, match="unknown --report_to"):
        open_trackers(("tensorbored",), "unused", "run", CONFIG)


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match=r"--report_to wandb needs the wandb package: pip install wandb"):
        open_trackers(("tensorboard", "wandb"), tmp_path, "run", CONFIG)
    # checked on every process, before anything is written
    with pytest.raises(UserError, match="pip install wandb"):
        open_trackers(("wandb",), tmp_path, "run", CONFIG, leader=False)
    assert list(tmp_path.iterdir()) == []


def test_none_and_non_leaders_write_nothing(tmp_path):
    log_all(open_trackers(("none",), tmp_path / "a", "run", CONFIG))
    log_all(open_trackers(("tensorboard", "wandb"), tmp_path / "b", "run", CONFIG, leader=False))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ TensorBoard

def accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def f32(pairs):
    """Event files store scalars as float32."""
    return [(s, float(np.float32(v))) for s, v in pairs]


def test_tensorboard_scalars(tmp_path):
    log_all(open_trackers(("tensorboard",), tmp_path, "dpo-beta0.1", CONFIG))
    acc = accumulator(tmp_path / "tensorboard")
    assert set(acc.Tags()["scalars"]) == set(EXPECTED)  # no train/split, train/step, eval/r_chosen
    for tag, pairs in EXPECTED.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == f32(pairs), tag


def hparams_of(acc):
    from tensorboard.plugins.hparams import plugin_data_pb2
    out = {}
    for tag, content in acc.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        out[tag] = getattr(data, data.WhichOneof("data"))
    return out


def test_tensorboard_hyperparameters(tmp_path):
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.util import tensor_util

    log_all(open_trackers(("tensorboard",), tmp_path, "dpo-beta0.1", CONFIG))
    acc = accumulator(tmp_path / "tensorboard")
    hp = hparams_of(acc)
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
              for k, v in hp["_hparams_/session_start_info"].hparams.items()}
    assert values == {"loss.loss_type": "dpo", "loss.beta": 0.1, "loss.label_smoothing": 0.0, "optim.lr": 5e-7,
                      "optim.lr_scheduler": "cosine", "loop.batch_size": 8, "loop.resume": "false",
                      "source.model": "sft-model", "source.columns.prompt": "question", "device": "auto",
                      "fsdp": "false"}  # loop.max_steps is null: left out
    assert {m.name.tag for m in hp["_hparams_/experiment"].metric_infos} >= {"train/loss", "eval/loss", "eval/acc"}
    assert hp["_hparams_/session_end_info"].status == api_pb2.Status.Value("STATUS_SUCCESS")
    text = tensor_util.make_ndarray(acc.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert json.loads(textwrap.dedent(text)) == CONFIG


def test_tensorboard_marks_a_failed_run(tmp_path):
    from tensorboard.plugins.hparams import api_pb2
    with pytest.raises(RuntimeError):
        with open_trackers(("tensorboard",), tmp_path, "run", CONFIG) as tracker:
            tracker.log(RECORDS[0])
            raise RuntimeError("the loss is nan")
    acc = accumulator(tmp_path / "tensorboard")
    assert hparams_of(acc)["_hparams_/session_end_info"].status == api_pb2.Status.Value("STATUS_FAILURE")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.6875)]


def test_tensorboard_resume_hides_what_a_killed_run_wrote_past_the_checkpoint(tmp_path):
    first = [{"split": "train", "step": s, "loss": v} for s, v in [(1, 1.0), (2, 0.75), (3, 0.5), (4, 0.25)]]
    log_all(open_trackers(("tensorboard",), tmp_path, "run", CONFIG), first)
    time.sleep(1.1)  # event files are read in name order, and the name starts with the time in whole seconds
    again = [{"split": "train", "step": s, "loss": v} for s, v in [(3, 0.625), (4, 0.375)]]
    log_all(open_trackers(("tensorboard",), tmp_path, "run", CONFIG, start_step=2), again)
    acc = accumulator(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.75), (3, 0.625), (4, 0.375)]


def test_real_training_config_is_accepted(tmp_path):
    from prefpipe.train.config import SourceConfig, TrainConfig
    cfg = TrainConfig(source=SourceConfig(model="m", cache="c"), out="o")
    resolved = cfg.resolved(cfg.runs()[0])
    log_all(open_trackers(("tensorboard",), tmp_path, "dpo-beta0.1", resolved))
    values = hparams_of(accumulator(tmp_path / "tensorboard"))["_hparams_/session_start_info"].hparams
    assert values["optim.lr"].number_value == 5e-7
    assert values["source.columns.chosen"].string_value == "chosen"
    assert values["loss.loss_type"].string_value == "dpo"


# ------------------------------------------------------------------ W&B (offline)

def wandb_records(path):
    """The protobuf records of a `.wandb` file: a 7-byte header, then 32 KiB blocks of chunks, each chunk a
    7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def item_key(item):
    """W&B stores a key holding "/" as its parts (`nested_key`), any other in `key`."""
    return item.key or "/".join(item.nested_key)


def complete_records(path):
    """The records of a finished run's file, or None while it is still being written."""
    from google.protobuf.message import DecodeError
    try:
        records = list(wandb_records(path))
    except DecodeError:  # a record cut short
        return None
    return records if any(r.WhichOneof("record_type") == "exit" for r in records) else None


def read_wandb_run(run_dir, wait_s: float = 30.0):
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("*.wandb"))
    assert len(files) == 1, files
    # `finish()` can return before W&B's service has written the file out (seen here: the run record missing);
    # the run's last record, `exit`, says it is complete
    deadline = time.monotonic() + wait_s
    while (records := complete_records(files[0])) is None:
        assert time.monotonic() < deadline, f"{files[0]} has no exit record after {wait_s} s"
        time.sleep(0.2)
    info, history, exit_code = None, {}, None
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            info = r.run
        elif kind == "history":
            history[r.history.step.num] = {item_key(i): json.loads(i.value_json) for i in r.history.item
                                           if not item_key(i).startswith("_")}
        elif kind == "exit":
            exit_code = r.exit.exit_code
    config = {item_key(i): json.loads(i.value_json) for i in info.config.update if item_key(i) != "_wandb"}
    return info, config, history, exit_code


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_INIT_TIMEOUT": "60",
                       "WANDB_DIR": tmp_path / "wandb-default", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                       "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data",
                       "WANDB_PROJECT": "pp-test", "WANDB_RUN_GROUP": "sweep-7"}.items():
        monkeypatch.setenv(var, str(value))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_runs_hold_config_and_history(tmp_path, wandb_offline):
    # two runs of a sweep, one after another in one process, as the training loop does
    log_all(open_trackers(("wandb",), tmp_path / "dpo-beta0.1", "dpo-beta0.1", CONFIG))
    second = [{"split": "train", "step": 1, "loss": 0.5, "nll": None}]
    log_all(open_trackers(("wandb",), tmp_path / "dpo-beta0.3", "dpo-beta0.3", CONFIG), second)
    assert not (tmp_path / "wandb-default").exists()  # under the run directory, not $WANDB_DIR

    info, config, history, exit_code = read_wandb_run(tmp_path / "dpo-beta0.1")
    assert (info.display_name, info.project, info.run_group) == ("dpo-beta0.1", "pp-test", "sweep-7")
    assert config == CONFIG
    expected = {}
    for tag, pairs in EXPECTED.items():
        for step, value in pairs:
            expected.setdefault(step, {})[tag] = value
    assert history == expected
    assert exit_code == 0

    info, _, history, _ = read_wandb_run(tmp_path / "dpo-beta0.3")
    assert info.display_name == "dpo-beta0.3"
    assert history == {1: {"train/loss": 0.5}}


# ------------------------------------------------------------------ through `prefpipe train`

def test_train_report_to_tensorboard_mirrors_metrics_jsonl(tiny_model, tmp_path, run_cli):
    """Every numeric value metrics.jsonl holds reaches TensorBoard at its step, train and eval alike."""
    from helpers import make_pairs, write_jsonl
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(12, seed=5, max_words=10))
    res = run_cli("train", "--model", tiny_model, "--data", data, "--loss_type", "orpo", "--out", tmp_path / "runs",
                  "--max_steps", "3", "--batch_size", "2", "--lr", "1e-3", "--eval_fraction", "0.25",
                  "--eval_every", "2", "--device", "cpu", "--no_progress", "--report_to", "tensorboard",
                  "--max_length", "64")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "orpo"
    records = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    acc = accumulator(run / "tensorboard")
    expected: dict[str, list] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(f"{r['split']}/{k}", []).append((r["step"], v))
    assert {"train/loss", "eval/loss"} <= set(expected)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, pairs in expected.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == f32(pairs), tag
    cfg = json.loads((run / rundir.CONFIG).read_text())
    assert "report_to" not in cfg  # where metrics go is not part of the run's identity
