"""Cache reuse against recompute: an unchanged run reuses, any changed fingerprint recomputes (the pipeline's own
caches: into a new directory), a cache the user named is never replaced without --recompute, and the log says why."""

import json
import re
import shutil

import pytest

from helpers import make_pairs, make_unpaired, write_jsonl
from prefpipe.pipeline.config import resolve
from prefpipe.pipeline.run import check_cache, expected_identity
from prefpipe.rundir import RunsDir
from train_fixtures import cache as precomputed
from prefpipe import rundir


def cfg_for(model, data, **kw):
    return resolve(None, {"model": str(model), "data": str(data), "max_length": 96, "max_prompt_length": 48, **kw})


@pytest.fixture(scope="module")
def cached(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("cachecheck")
    data = write_jsonl(d / "pairs.jsonl", make_pairs(10, seed=3))
    out = precomputed(tmp_path_factory, tiny_model, data, "cachecheck-cache", max_length=96, max_prompt_length=48)
    return d, data, out


def check(cfg, out, *, kto=False, recompute=False):
    return check_cache(str(out), expected_identity(cfg.settings.model, cfg.settings.data, cfg, kto=kto), recompute=recompute)


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
    # Parts are stitched into one cache, so they must come from one run: blocks of one size, one dtype.
    c = check(cfg_for(tiny_model, data, part_rows=3), partial)
    assert c.action == "recompute" and "part_rows differs (cache 4096, now 3)" in c.reason
    c = check(cfg_for(tiny_model, data, dtype="bfloat16"), partial)
    assert c.action == "recompute" and "dtype differs (cache float32, now bfloat16)" in c.reason


def test_finished_cache_is_reused_across_dtype_and_part_rows(cached, tiny_model):
    """Backend settings change numerics, not meaning: a finished cache serves them."""
    d, data, out = cached
    assert check(cfg_for(tiny_model, data, part_rows=3, dtype="bfloat16"), out).action == "reuse"


TOML = ('model = "{model}"\ndata = "pairs.jsonl"\nruns_dir = "runs"\nloss_type = ["dpo"]\nbeta = [0.1]\n'
        'device = "cpu"\nprogress = false\n{extra}[precompute]\nmax_length = 96\nmax_prompt_length = 48\n'
        'part_rows = 4\n[train]\nmax_steps = 1\nbatch_size = 4\nlr = 1e-3\ndrift_rows = 4\n')


def pipeline_toml(tmp_path, model, extra=""):
    write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8, seed=5))
    toml = tmp_path / "run.toml"
    toml.write_text(TOML.format(model=model, extra=extra))
    return toml


def own_caches(runs, prefix="cache"):
    return sorted(p for p in runs.iterdir() if re.fullmatch(prefix + r"-[0-9a-f]{12}", p.name))


def test_pipeline_reuses_then_builds_a_new_cache(tiny_model, tmp_path, run_cli):
    """The real `prefpipe pipeline` twice unchanged (second run reuses, cache untouched), then with a changed
    setting (a new cache beside the old one, which stays); an ORPO-only config runs no phase one."""
    toml = pipeline_toml(tmp_path, tiny_model)
    runs = tmp_path / "runs"
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    [first_cache] = own_caches(runs)
    assert f"cache {first_cache}: computing (no cache there yet)" in r.output
    manifest = first_cache / "manifest.json"
    first = manifest.read_text()
    mtime = manifest.stat().st_mtime_ns

    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    assert f"cache {first_cache}: reusing (model, tokenizer, tokenization and data fingerprints match)" in r.output
    assert manifest.stat().st_mtime_ns == mtime and manifest.read_text() == first

    r = run_cli("pipeline", "--config", toml, "--max_length", "80")
    assert r.exit_code == 0, r.output
    [second_cache] = [c for c in own_caches(runs) if c != first_cache]
    assert f"cache {second_cache}: computing (no cache there yet)" in r.output
    assert json.loads((second_cache / "manifest.json").read_text())["metadata"]["tokenization"]["max_length"] == 80
    assert manifest.stat().st_mtime_ns == mtime and manifest.read_text() == first  # the old cache is kept

    summary = json.loads(RunsDir(runs).pipeline.read_text())
    assert summary["caches"]["paired"] == {"path": str(second_cache), "action": "compute",
                                           "reason": "no cache there yet"}
    assert [r["name"] for r in summary["runs"]] == ["dpo-beta0.1"]
    trained = json.loads((runs / "dpo-beta0.1" / rundir.CONFIG).read_text())
    assert trained["source"]["cache"] == str(second_cache)

    r = run_cli("pipeline", "--config", toml, "--max_length", "80")  # back to the second: reused, not rebuilt
    assert f"cache {second_cache}: reusing" in r.output and len(own_caches(runs)) == 2

    # ORPO alone: no beta and no phase-one keys (part_rows), which would have no effect (and are refused)
    orpo = tmp_path / "orpo.toml"
    orpo.write_text(toml.read_text().replace("beta = [0.1]\n", "").replace("part_rows = 4\n", ""))
    r = run_cli("pipeline", "--config", orpo, "--loss_type", "orpo", "--runs_dir", tmp_path / "orpo-runs")
    assert r.exit_code == 0, r.output
    assert "phase one skipped: orpo need no reference log-probs" in r.output
    assert not own_caches(tmp_path / "orpo-runs")
    assert (tmp_path / "orpo-runs" / "orpo" / rundir.FINAL / "config.json").exists()


def test_a_cache_the_user_named_is_never_replaced_without_recompute(tiny_model, tmp_path, run_cli):
    toml = pipeline_toml(tmp_path, tiny_model, extra='cache = "mine"\n')
    mine = tmp_path / "mine"
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    assert f"cache {mine}: computing (no cache there yet)" in r.output
    manifest = (mine / "manifest.json").read_text()

    r = run_cli("pipeline", "--config", toml, "--max_length", "80", "--runs_dir", tmp_path / "other-runs")
    assert r.exit_code == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in r.output
    assert str(mine) in err and "tokenization settings differ (max_length: cache 96, now 80)" in err
    assert "--recompute" in err and "set cache to another path" in err
    assert (mine / "manifest.json").read_text() == manifest  # untouched
    assert not (tmp_path / "other-runs" / "dpo-beta0.1").exists()  # refused before any compute or training

    r = run_cli("pipeline", "--config", toml, "--max_length", "80", "--recompute")
    assert r.exit_code == 0, r.output
    assert f"cache {mine}: recomputing (--recompute was given)" in r.output
    assert json.loads((mine / "manifest.json").read_text())["metadata"]["tokenization"]["max_length"] == 80


def test_unfinished_cache_from_other_part_rows_is_recomputed_or_refused(tiny_model, tmp_path, run_cli):
    """An unfinished cache whose parts were cut by another part_rows cannot be resumed: the pipeline's own cache is
    recomputed in place; a cache the user named is refused (it is theirs to delete)."""
    toml = pipeline_toml(tmp_path, tiny_model)
    runs = tmp_path / "runs"
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    [c] = own_caches(runs)
    assert len(list(c.glob("part-*.parquet"))) == 2  # 8 pairs, 4 per part
    mine = tmp_path / "mine"
    shutil.copytree(c, mine)
    for d in (c, mine):
        (d / "manifest.json").unlink()

    r = run_cli("pipeline", "--config", toml, "--part_rows", "3")
    assert r.exit_code == 0, r.output
    assert (f"cache {c}: recomputing (an unfinished cache from a different run (part_rows differs (cache 4, now 3)))"
            in r.output)
    assert len(list(c.glob("part-*.parquet"))) == 3 and (c / "manifest.json").exists()

    r = run_cli("pipeline", "--config", toml, "--part_rows", "3", "--cache", mine)
    assert r.exit_code == 2 and "part_rows differs (cache 4, now 3)" in r.stderr and "--recompute" in r.stderr
    assert len(list(mine.glob("part-*.parquet"))) == 2 and not (mine / "manifest.json").exists()


def test_data_kinds_are_checked_before_any_cache(tiny_model, tmp_path, run_cli):
    """Unpaired data cannot serve dpo: the pipeline says so before computing the kto cache (or any other)."""
    unpaired = write_jsonl(tmp_path / "kto.jsonl", make_unpaired(8, seed=2))
    common = ["--model", tiny_model, "--runs_dir", tmp_path / "runs", "--max_steps", "1", "--device", "cpu",
              "--no_progress", "--max_length", "96", "--max_prompt_length", "48"]
    r = run_cli("pipeline", *common, "--data", unpaired, "--loss_type", "kto", "--loss_type", "dpo")
    assert r.exit_code == 2
    assert "dpo trains on pairs" in r.stderr and str(unpaired) in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    pairs = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(6, seed=2))
    r = run_cli("pipeline", *common, "--data", pairs, "--loss_type", "dpo", "--eval_data", unpaired)
    assert r.exit_code == 2 and "eval_data must hold pairs" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_pipeline_kto_from_unpaired_data(tiny_model, tmp_path, run_cli, monkeypatch):
    """dpo + kto + eval_data: three caches, two train calls, evaluations; the SFT weights are hashed once."""
    from prefpipe.data import fingerprint
    hashed = []
    real = fingerprint._hash_files
    monkeypatch.setattr(fingerprint, "_hash_files", lambda files: hashed.append(files) or real(files))
    monkeypatch.setattr(fingerprint, "_MODEL_FINGERPRINTS", {})  # as in a fresh process

    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(6, seed=2))
    kto = write_jsonl(tmp_path / "kto.jsonl", make_unpaired(8, seed=2))
    held_out = write_jsonl(tmp_path / "held.jsonl", make_pairs(4, seed=9))
    r = run_cli("pipeline", "--model", tiny_model, "--data", data, "--kto_data", kto, "--eval_data", held_out,
                "--loss_type", "kto",
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
    [kto_cache] = own_caches(tmp_path / "runs", "cache-kto")
    meta = json.loads((kto_cache / "manifest.json").read_text())["metadata"]
    assert meta["kind"] == "unpaired" and meta["counts"]["rows_written"] == 8
    [eval_cache] = own_caches(tmp_path / "runs", "cache-eval")
    assert json.loads((eval_cache / "manifest.json").read_text())["metadata"]["counts"]["rows_written"] == 4
    assert set(summary["evals"]) == {"dpo-beta0.1", "dpo-beta0.2", "kto-beta0.3"}
    assert [sorted(f.name for f in files) for files in hashed] == [["config.json", "model.safetensors"]]
    assert all(f.parent == tiny_model for f in hashed[0])
    for name in ("dpo-beta0.1", "kto-beta0.3"):
        assert (tmp_path / "runs" / name / rundir.METRICS).exists()
    lrs = {x["name"]: json.loads((tmp_path / "runs" / x["name"] / rundir.CONFIG).read_text())["optim"]["lr"]
           for x in summary["runs"]}
    assert lrs == {"dpo-beta0.1": 1e-3, "dpo-beta0.2": 1e-3, "kto-beta0.3": 2e-3}
    assert (tmp_path / "runs" / "curves.png").exists() and (tmp_path / "runs" / "summary.md").exists()
