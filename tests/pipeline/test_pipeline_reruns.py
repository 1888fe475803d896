"""A pipeline rerun keeps every finished run whose settings match (not trained again: same bytes, same mtimes),
continues an unfinished one from its last checkpoint to the weights an uninterrupted run reaches, and replaces
only the runs whose settings changed; `eval_cache` alone is evaluated."""

import json
import shutil

import pytest
import torch

from helpers import make_pairs, make_unpaired, write_jsonl
from prefpipe import rundir
from prefpipe.rundir import RunsDir
from train_fixtures import TIMING_KEYS

TOML = ('model = "{model}"\ndata = "pairs.jsonl"\nkto_data = "kto.jsonl"\nruns_dir = "runs"\n'
        'loss_type = ["dpo", "kto"]\nbeta = [0.1]\nkto_beta = [0.3]\ndevice = "cpu"\ndtype = "float32"\n'
        'progress = false\n[precompute]\nmax_length = 96\nmax_prompt_length = 48\n'
        '[train]\nmax_steps = {steps}\nsave_every = 2\nbatch_size = 4\nlr = 1e-3\ndrift_rows = 4\nseed = 3\n')


def setup(tmp_path, model, steps=2, **replace):
    write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8, seed=5))
    write_jsonl(tmp_path / "kto.jsonl", make_unpaired(8, seed=5))
    text = TOML.format(model=model, steps=steps)
    for old, new in replace.items():
        text = text.replace(old, new)
    toml = tmp_path / "run.toml"
    toml.write_text(text)
    return toml, tmp_path / "runs"


def weights(run) -> tuple[int, bytes]:
    f = run / rundir.FINAL / "model.safetensors"
    return f.stat().st_mtime_ns, f.read_bytes()


def test_unchanged_rerun_trains_nothing_and_a_changed_setting_replaces_only_its_run(tiny_model, tmp_path,
                                                                                     run_cli):
    toml, runs = setup(tmp_path, tiny_model)
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    first_output = r.output
    first = {name: weights(runs / name) for name in ("dpo-beta0.1", "kto-beta0.3")}
    metrics = (runs / "dpo-beta0.1" / rundir.METRICS).read_text()

    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    for name in first:
        assert weights(runs / name) == first[name]  # not rewritten: same bytes, same mtime
        assert f"run {name}: training (no run there yet)" in first_output
        assert f"run {name}: keeping (finished with these settings; not trained again)" in r.output
    assert "replacing" not in r.output and "steps of" not in r.output  # no train call at all
    assert (runs / "dpo-beta0.1" / rundir.METRICS).read_text() == metrics
    summary = json.loads(RunsDir(runs).pipeline.read_text())
    assert [x["name"] for x in summary["runs"]] == ["dpo-beta0.1", "kto-beta0.3"]

    # kto_lr reaches the kto run only: it alone is replaced, and the dpo run stays as it was.
    r = run_cli("pipeline", "--config", toml, "--kto_lr", "2e-3")
    assert r.exit_code == 0, r.output
    assert "run dpo-beta0.1: keeping" in r.output
    assert "run kto-beta0.3: replacing (settings changed: optim.lr)" in r.output
    assert weights(runs / "dpo-beta0.1") == first["dpo-beta0.1"]
    assert weights(runs / "kto-beta0.3")[0] != first["kto-beta0.3"][0]
    assert json.loads((runs / "kto-beta0.3" / rundir.CONFIG).read_text())["optim"]["lr"] == 2e-3

    # Another beta is another run: trained beside the kept one.
    r = run_cli("pipeline", "--config", toml, "--kto_lr", "2e-3", "--beta", "0.1", "--beta", "0.2")
    assert r.exit_code == 0, r.output
    assert "run dpo-beta0.1: keeping" in r.output and "run kto-beta0.3: keeping" in r.output
    assert "run dpo-beta0.2: training (no run there yet)" in r.output
    assert weights(runs / "dpo-beta0.1") == first["dpo-beta0.1"]

    # --recompute rebuilds the caches: a run trained on the old bytes is trained again.
    r = run_cli("pipeline", "--config", toml, "--kto_lr", "2e-3", "--recompute")
    assert r.exit_code == 0, r.output
    assert weights(runs / "dpo-beta0.1")[0] != first["dpo-beta0.1"][0]
    assert "run dpo-beta0.1: replacing (its cache was computed again by this pipeline)" in r.output


def _lines(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / rundir.METRICS).read_text().splitlines()]


@pytest.mark.slow
def test_an_interrupted_run_continues_from_its_checkpoint_to_the_uninterrupted_weights(tiny_model, tmp_path,
                                                                                        run_cli):
    from safetensors.torch import load_file

    toml, runs = setup(tmp_path, tiny_model, steps=6, **{'"kto"]': ']', 'kto_data = "kto.jsonl"\n': '',
                                                         'kto_beta = [0.3]\n': ''})
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    run = runs / "dpo-beta0.1"
    straight = load_file(run / rundir.FINAL / "model.safetensors")
    straight_lines = _lines(run)
    assert [x["step"] for x in straight_lines] == [1, 2, 3, 4, 5, 6]

    # What a run killed after step 3 leaves: checkpoints up to step 2, metrics past it, no final model.
    shutil.rmtree(run / rundir.FINAL)
    shutil.rmtree(run / rundir.CHECKPOINTS / "step-000004")
    (run / rundir.RESULT).unlink()
    metrics = run / rundir.METRICS
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:3]))
    kept_ckpt = (run / rundir.CHECKPOINTS / "step-000002" / "model.safetensors").stat().st_mtime_ns

    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    assert "resuming after step 2" in r.output  # train's own line: it went on from the checkpoint
    assert (run / rundir.CHECKPOINTS / "step-000002" / "model.safetensors").stat().st_mtime_ns == kept_ckpt
    assert "run dpo-beta0.1: continuing (unfinished; from its checkpoint step-000002)" in r.output
    resumed = load_file(run / rundir.FINAL / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6)
    assert len(_lines(run)) == len(straight_lines)
    for a, b in zip(straight_lines, _lines(run)):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a), (a, b)


def held_cache_and_dpo_pipeline(tmp_path, model, cache_model, run_cli):
    """A held-out cache of 4 pairs made from `cache_model`, and a dpo-only pipeline of `model` (no kto run)."""
    held = write_jsonl(tmp_path / "held.jsonl", make_pairs(4, seed=9))
    cache = tmp_path / "held-cache"
    r = run_cli("precompute", "--model", cache_model, "--data", held, "--out", cache, "--max_length", "96",
                "--max_prompt_length", "48", "--dtype", "float32", "--device", "cpu", "--no_progress")
    assert r.exit_code == 0, r.output
    toml, runs = setup(tmp_path, model, **{'"kto"]': ']', 'kto_data = "kto.jsonl"\n': '', 'kto_beta = [0.3]\n': ''})
    return cache, toml, runs


def test_eval_cache_alone_is_evaluated(tiny_model, tmp_path, run_cli):
    """A held-out cache without eval_data gives held-out reward accuracy (it used to be ignored: `evals: {}`)."""
    cache, toml, runs = held_cache_and_dpo_pipeline(tmp_path, tiny_model, tiny_model, run_cli)
    r = run_cli("pipeline", "--config", toml, "--eval_cache", cache)
    assert r.exit_code == 0, r.output
    summary = json.loads(RunsDir(runs).pipeline.read_text())
    pref = summary["evals"]["dpo-beta0.1"]["pref"]
    assert pref["rows"] == 4 and pref["cache"] == str(cache) and pref["acc"] == pref["wins"] / 4
    assert f"cache {cache}: reusing (eval_cache as given: its model and tokenizer fingerprints match)" in r.output
    assert json.loads((runs / "dpo-beta0.1" / rundir.EVAL_PREF).read_text()) == pref
    assert "held-out reward accuracy" in summary["report"]["headline"]  # ranked on the held-out number


def test_eval_cache_alone_from_another_model_is_refused_before_training(tiny_model, tmp_path, run_cli):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model, other)
    from safetensors.torch import load_file, save_file
    w = load_file(other / "model.safetensors")
    name = sorted(w)[0]
    w[name] = w[name] + 1e-3
    save_file(w, other / "model.safetensors", metadata={"format": "pt"})
    cache, toml, runs = held_cache_and_dpo_pipeline(tmp_path, tiny_model, other, run_cli)
    r = run_cli("pipeline", "--config", toml, "--eval_cache", cache)
    assert r.exit_code == 2
    assert r.output.strip().startswith(f"prefpipe: error: file {cache}: eval_cache cannot measure this "
                                       "pipeline's runs (model fingerprint differs")
    assert not (runs / "dpo-beta0.1").exists()
