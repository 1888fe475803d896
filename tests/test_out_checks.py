"""Outputs are checked before any work: an --out that cannot be written, a data folder given as a cache, and
`train --overwrite` (replaces this call's run directories, nothing else)."""

from __future__ import annotations

import json

import pytest

from prefpipe.errors import UserError
from train_fixtures import one_thread, pairs_data  # noqa: F401 (one_thread: autouse fixture)
from prefpipe import rundir

MISSING_MODEL = "/nonexistent/model"  # loading it would fail: an --out error proves the check came first


def one_line_error(result, *phrases):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("prefpipe: error: "), err
    for p in phrases:
        assert p in err, err
    assert "model" not in err.split(":", 2)[-1].split("(")[0], err  # about --out, not the model


@pytest.fixture
def bad_outs(tmp_path):
    regular = tmp_path / "file.txt"
    regular.write_text("x")
    return {"/proc/prefpipe-out": "cannot be created", str(regular / "sub"): "is a file, not a directory",
            str(regular): "exists and is not a directory"}


def test_train_refuses_unwritable_out_before_loading(run_cli, bad_outs, tmp_path_factory):
    data = pairs_data(tmp_path_factory)
    for out, phrase in bad_outs.items():
        r = run_cli("train", "--model", MISSING_MODEL, "--data", data, "--loss_type", "orpo", "--out", out,
                    "--device", "cpu")
        one_line_error(r, f"file {out}", "--out", phrase)


def test_precompute_refuses_unwritable_out_before_loading(run_cli, bad_outs, tmp_path_factory):
    data = pairs_data(tmp_path_factory)
    for out, phrase in bad_outs.items():
        r = run_cli("precompute", "--model", MISSING_MODEL, "--data", data, "--out", out, "--device", "cpu")
        one_line_error(r, f"file {out}", "--out", phrase)


def test_eval_refuses_unwritable_out_before_loading(run_cli, bad_outs, tiny_model, tmp_path):
    gen = tmp_path / "q.jsonl"
    gen.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    for out, phrase in bad_outs.items():
        r = run_cli("eval", "--model", tiny_model, "--gen", gen, "--out", out, "--device", "cpu")
        one_line_error(r, f"file {out}", "--out", phrase)


def test_pipeline_refuses_unwritable_runs_dir_before_loading(bad_outs, tmp_path_factory):
    from prefpipe.pipeline.config import resolve
    from prefpipe.pipeline.run import run_pipeline
    data = pairs_data(tmp_path_factory)
    for out, phrase in bad_outs.items():
        cfg = resolve(None, {"model": MISSING_MODEL, "data": str(data), "runs_dir": out, "loss_type": ["orpo"]})
        with pytest.raises(UserError, match=f"runs_dir.*{phrase}"):
            run_pipeline(cfg, log=lambda m: None)


def test_precompute_refuses_a_data_folder_as_out(run_cli, tiny_model, tmp_path, tmp_path_factory):
    folder = tmp_path / "data"
    folder.mkdir()
    src = pairs_data(tmp_path_factory)
    (folder / "pairs.jsonl").write_text(src.read_text())
    r = run_cli("precompute", "--model", tiny_model, "--data", folder, "--out", folder, "--device", "cpu")
    one_line_error(r, f"file {folder}", "not a cache", "pairs.jsonl")
    assert sorted(p.name for p in folder.iterdir()) == ["pairs.jsonl"]
    # An empty directory and a finished cache are fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    for _ in range(2):  # the second run reuses the cache it finds there
        r = run_cli("precompute", "--model", tiny_model, "--data", src, "--out", empty, "--device", "cpu",
                    "--dtype", "float32", "--no_progress")
        assert r.exit_code == 0, r.output
    assert (empty / "manifest.json").exists()


def train(out, model, *, data, loss_types, max_steps, resume=False, overwrite=False):
    from prefpipe.train.config import LoopConfig, OptimConfig, SourceConfig, TrainConfig
    from prefpipe.train.loop import run_training
    return run_training(TrainConfig(
        source=SourceConfig(model=str(model), data=str(data)), out=str(out), loss_types=loss_types,
        optim=OptimConfig(lr=1e-3), loop=LoopConfig(batch_size=4, max_steps=max_steps, resume=resume,
                                                    overwrite=overwrite),
        dtype="float32", device="cpu", progress=False))


def test_train_overwrite_replaces_only_this_calls_runs(tmp_path, tiny_model, tmp_path_factory):
    data = pairs_data(tmp_path_factory)
    out = tmp_path / "runs"
    train(out, tiny_model, data=data, loss_types=("orpo", "sft"), max_steps=2)
    (out / "notes.txt").write_text("mine")
    (out / "orpo" / "marker").write_text("old run")
    with pytest.raises(UserError, match="--overwrite to replace it"):
        train(out, tiny_model, data=data, loss_types=("orpo",), max_steps=3)
    with pytest.raises(UserError, match="exclude each other"):
        train(out, tiny_model, data=data, loss_types=("orpo",), max_steps=3, resume=True, overwrite=True)
    train(out, tiny_model, data=data, loss_types=("orpo",), max_steps=3, overwrite=True)
    assert not (out / "orpo" / "marker").exists()
    assert len((out / "orpo" / rundir.METRICS).read_text().splitlines()) == 3  # the new run alone
    assert (out / "notes.txt").read_text() == "mine"
    assert len((out / "sft" / rundir.METRICS).read_text().splitlines()) == 2  # not this call's: kept
    runs = {r["name"]: r["steps"] for r in json.loads((out / rundir.SUMMARY).read_text())["runs"]}
    assert runs == {"sft": 2, "orpo": 3}
