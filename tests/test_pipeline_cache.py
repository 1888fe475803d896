"""Cache reuse against recompute: an unchanged run reuses, any changed fingerprint recomputes, and the log says why."""

import json
import shutil

import pytest

from conftest import make_pairs, make_unpaired, write_jsonl
from prefpipe.pipeline.config import resolve
from prefpipe.pipeline.run import check_cache, expected_identity
from prefpipe.rundir import RunsDir
from test_train_fixtures import cache as precomputed


def cfg_for(model, data, **kw):
    return resolve(None, {"model": str(model), "data": str(data), "max_length": 96, "max_prompt_length": 48, **kw})


@pytest.fixture(scope="module")
def cached(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("cachecheck")
    data = write_jsonl(d / "pairs.jsonl", make_pairs(10, seed=3))
    out = precomputed(tmp_path_factory, tiny_model, data, "cachecheck-cache", max_length=96, max_prompt_length=48)
    return d, data, out


def check(cfg, out, **kw):
    kw.setdefault("kto", False)
    kw.setdefault("needs_reference", True)
    kw.setdefault("recompute", False)
    return check_cache(str(out), expected_identity(cfg.model, cfg.data, cfg), **kw)


def test_unchanged_run_reuses(cached, tiny_model):
    d, data, out = cached
    c = check(cfg_for(tiny_model, data), out)
    assert c.action == "reuse"
    assert "model, tokenizer, tokenization and data fingerprints match" in c.line()


def test_changed_tokenization_recomputes(cached, tiny_model):
    d, data, out = cached
    c = check(cfg_for(tiny_model, data, max_length=80), out)
    assert c.action == "recompute"
    assert "tokenization settings differ (max_length: cache 96, now 80)" in c.reason


def test_changed_data_recomputes(cached, tiny_model, tmp_path):
    d, data, out = cached
    rows = make_pairs(10, seed=3)
    rows[4]["chosen"] += " extra"
    other = write_jsonl(tmp_path / "pairs.jsonl", rows)
    c = check(cfg_for(tiny_model, other), out)
    assert c.action == "recompute" and c.reason.startswith("data fingerprint differs")


def test_changed_model_weights_recompute(cached, tiny_model, tmp_path):
    d, data, out = cached
    other = tmp_path / "model"
    shutil.copytree(tiny_model, other)
    from safetensors.torch import load_file, save_file
    w = other / "model.safetensors"
    tensors = load_file(w)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3  # same shapes, other weights: only a weights hash can notice
    save_file(tensors, w, metadata={"format": "pt"})
    c = check(cfg_for(other, data), out)
    assert c.action == "recompute"
    assert c.reason.startswith("model fingerprint differs")
    assert "tokenizer" not in c.reason  # the tokenizer files were copied unchanged


def test_wrong_kind_missing_reference_recompute_flag_and_empty(cached, tiny_model, tmp_path, tmp_path_factory):
    d, data, out = cached
    cfg = cfg_for(tiny_model, data)
    assert check(cfg, out, kto=True).reason.endswith("it holds pairs, this run needs KTO examples")
    assert check(cfg, out, recompute=True).action == "recompute"
    assert check(cfg, tmp_path / "nothing").action == "compute"
    orpo = precomputed(tmp_path_factory, tiny_model, data, "cachecheck-orpo", max_length=96, max_prompt_length=48,
                       no_reference=True)
    assert "no reference log-probs" in check(cfg, orpo).reason


def test_unfinished_cache_resumes_only_if_it_is_ours(cached, tiny_model, tmp_path):
    d, data, out = cached
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / "manifest.json").unlink()
    assert check(cfg_for(tiny_model, data), partial).action == "resume"
    assert check(cfg_for(tiny_model, data, max_length=80), partial).action == "recompute"


def test_pipeline_reuses_then_recomputes(tiny_model, tmp_path, run_cli):
    """The real `prefpipe pipeline` twice unchanged (second run reuses, cache untouched), then with a changed
    setting (recomputes); an ORPO-only config runs no phase one; kto gets its own cache of examples."""
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8, seed=5))
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tiny_model}"\ndata = "pairs.jsonl"\nruns_dir = "runs"\nloss_type = ["dpo"]\n'
                    'beta = [0.1]\ndevice = "cpu"\nprogress = false\n[precompute]\nmax_length = 96\n'
                    'max_prompt_length = 48\n[train]\nmax_steps = 1\nbatch_size = 4\nlr = 1e-3\ndrift_rows = 4\n')
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    assert f"cache {tmp_path / 'runs' / 'cache'}: computing (no cache there yet)" in r.output
    manifest = tmp_path / "runs" / "cache" / "manifest.json"
    first = manifest.read_text()
    mtime = manifest.stat().st_mtime_ns

    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    assert "reusing (model, tokenizer, tokenization and data fingerprints match)" in r.output
    assert manifest.stat().st_mtime_ns == mtime and manifest.read_text() == first

    r = run_cli("pipeline", "--config", toml, "--max_length", "80")
    assert r.exit_code == 0, r.output
    assert "recomputing (tokenization settings differ (max_length: cache 96, now 80))" in r.output
    meta = json.loads(manifest.read_text())["metadata"]
    assert meta["tokenization"]["max_length"] == 80

    summary = json.loads(RunsDir(tmp_path / "runs").pipeline.read_text())
    assert summary["caches"]["paired"]["action"] == "recompute"
    assert [r["name"] for r in summary["runs"]] == ["dpo-beta0.1"]

    r = run_cli("pipeline", "--config", toml, "--loss_type", "orpo", "--runs_dir", tmp_path / "orpo-runs")
    assert r.exit_code == 0, r.output
    assert "phase one skipped: orpo need no reference log-probs" in r.output
    assert not (tmp_path / "orpo-runs" / "cache").exists()
    assert (tmp_path / "orpo-runs" / "orpo" / "final" / "config.json").exists()


def test_pipeline_kto_from_unpaired_data(tiny_model, tmp_path, run_cli):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(6, seed=2))
    kto = write_jsonl(tmp_path / "kto.jsonl", make_unpaired(8, seed=2))
    r = run_cli("pipeline", "--model", tiny_model, "--data", data, "--kto_data", kto, "--loss_type", "kto",
                "--loss_type", "dpo", "--beta", "0.1", "--beta", "0.2", "--kto_beta", "0.3", "--kto_lr", "2e-3",
                "--runs_dir", tmp_path / "runs", "--max_steps", "1", "--batch_size", "2", "--lr", "1e-3",
                "--max_length", "96", "--max_prompt_length", "48", "--device", "cpu", "--no_progress",
                "--drift_rows", "2")
    assert r.exit_code == 0, r.output
    summary = json.loads(RunsDir(tmp_path / "runs").pipeline.read_text())
    assert [x["name"] for x in summary["runs"]] == ["dpo-beta0.1", "dpo-beta0.2", "kto-beta0.3"]
    # the two train calls (pairs, then kto) both land in summary.json: the second adds to the first
    trained = json.loads(RunsDir(tmp_path / "runs").summary.read_text())
    assert [x["name"] for x in trained["runs"]] == ["dpo-beta0.1", "dpo-beta0.2", "kto-beta0.3"]
    meta = json.loads((tmp_path / "runs" / "cache-kto" / "manifest.json").read_text())["metadata"]
    assert meta["kind"] == "unpaired" and meta["counts"]["rows_written"] == 8
    for name in ("dpo-beta0.1", "kto-beta0.3"):
        assert (tmp_path / "runs" / name / "metrics.jsonl").exists()
    lrs = {x["name"]: json.loads((tmp_path / "runs" / x["name"] / "train_config.json").read_text())["optim"]["lr"]
           for x in summary["runs"]}
    assert lrs == {"dpo-beta0.1": 1e-3, "dpo-beta0.2": 1e-3, "kto-beta0.3": 2e-3}
    assert (tmp_path / "runs" / "curves.png").exists() and (tmp_path / "runs" / "summary.md").exists()
