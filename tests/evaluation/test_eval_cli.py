"""`prefpipe eval`: where results go, where beta comes from, and what an all-tie result says."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import make_pairs, write_jsonl
from train_fixtures import cache as precomputed
from prefpipe import rundir


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcli")
    data = write_jsonl(d / "pairs.jsonl", make_pairs(6, seed=3))
    cache = precomputed(tmp_path_factory, tiny_model, data, "evalcli-cache", max_length=64, max_prompt_length=32)
    return d, cache


def copy_model(tiny_model, dest):
    shutil.copytree(tiny_model, dest)
    return dest


def test_plain_model_dir_is_not_written_into(setup, tiny_model, run_cli, tmp_path, monkeypatch):
    d, cache = setup
    model = copy_model(tiny_model, tmp_path / "sft-model")
    before = sorted(p.name for p in model.iterdir())
    monkeypatch.chdir(tmp_path)
    r = run_cli("eval", "--model", model, "--cache", cache, "--beta", "0.5", "--device", "cpu", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in model.iterdir()) == before
    saved = json.loads((tmp_path / "eval-sft-model" / rundir.EVAL_PREF).read_text())
    assert saved["rows"] == 6 and saved["beta"] == 0.5
    # The reference model scored against its own cache: every pair ties, and the line says so.
    assert saved["acc"] == 0.0 and saved["wins"] == 0 and saved["ties"] == 6
    assert "0 of 6 pairs strictly preferred" in r.output
    assert "all 6 pairs tie" in r.output and "reference model itself?" in r.output
    assert "eval-sft-model/eval_pref.json" in r.output


def test_beta_comes_from_the_run(setup, tiny_model, run_cli, tmp_path):
    """RUN/final and a model with train_config.json need no --beta; results of RUN/final go to RUN."""
    d, cache = setup
    run = tmp_path / "dpo-beta0.3"
    copy_model(tiny_model, run / rundir.FINAL)
    (run / rundir.FINAL / rundir.CONFIG).write_text(json.dumps({"loss": {"loss_type": "dpo", "beta": 0.3}}))
    (run / rundir.RESULT).write_text(json.dumps({"name": "dpo-beta0.3", "loss_type": "dpo", "beta": 0.3}))
    r = run_cli("eval", "--model", run / rundir.FINAL, "--cache", cache, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert json.loads((run / rundir.EVAL_PREF).read_text())["beta"] == 0.3
    assert not (run / rundir.FINAL / rundir.EVAL_PREF).exists()
    ckpt = copy_model(run / rundir.FINAL, tmp_path / "step-000004")  # a checkpoint: train_config.json, no result.json
    out = tmp_path / "ckpt-eval"
    r = run_cli("eval", "--model", ckpt, "--cache", cache, "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / rundir.EVAL_PREF).read_text())["beta"] == 0.3
    r = run_cli("eval", "--model", tiny_model, "--cache", cache, "--device", "cpu", "--out", out)
    assert r.exit_code == 2 and "pass --beta" in r.stderr
