"""Ctrl-C: a real `prefpipe train` / `prefpipe precompute` process gets SIGINT mid-run and says where it stopped
and how to continue (not click's bare `Aborted!`), with exit status 130."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_pairs, write_jsonl
from train_fixtures import one_thread  # noqa: F401  (autouse)
from train_fixtures import cache, pairs_data, wait_for
from prefpipe import rundir

# Far more steps than can run before the interrupt lands, so the process is always mid-run when signalled.
ARGS = ["--lr", "1e-3", "--batch_size", "4", "--max_steps", "5000", "--seed", "3", "--dtype", "float32",
        "--device", "cpu", "--no_progress"]


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory, tiny_model):
    return cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 24), "pairs24")


def _start(*args):
    return subprocess.Popen([sys.executable, "-m", "prefpipe", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _interrupt(proc) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err[-3000:]
    assert "Aborted!" not in err and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def _logged_steps(run: Path) -> list[int]:
    steps = []
    for line in run.joinpath(rundir.METRICS).read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass  # a line cut short by the interrupt
    return steps


@pytest.mark.slow
def test_interrupted_train_names_the_last_checkpoint_and_resume(tmp_path, tiny_model, pair_cache):
    out = tmp_path / "runs"
    run = out / "dpo-beta0.1"
    proc = _start("train", "--model", tiny_model, "--cache", pair_cache, *ARGS, "--save_every", "1",
                  "--keep_checkpoints", "0", "--out", out)
    wait_for(lambda: (run / rundir.CHECKPOINTS / "step-000002").exists(), proc)
    line = _interrupt(proc)

    m = re.fullmatch(r"prefpipe: interrupted at step (\d+) of dpo-beta0\.1; last checkpoint (\S+); rerun the same "
                     r"command with --resume to continue from it", line)
    assert m, line
    # Every step saved a checkpoint; the newest whole one (with its trainer state) is the one to resume from.
    saved = sorted(int(p.name[len("step-"):]) for p in (run / rundir.CHECKPOINTS).iterdir()
                   if p.name.startswith("step-") and (p / "trainer_state.pt").exists())
    assert saved[0] == 1 and saved[-1] >= 2
    assert Path(m.group(2)) == run / "checkpoints" / f"step-{saved[-1]:06d}"
    assert int(m.group(1)) == max(_logged_steps(run)) >= saved[-1]
    assert not (run / rundir.FINAL).exists()


@pytest.mark.slow
def test_interrupted_train_without_checkpoints_says_so(tmp_path, tiny_model, pair_cache):
    out = tmp_path / "runs"
    run = out / "dpo-beta0.1"
    proc = _start("train", "--model", tiny_model, "--cache", pair_cache, *ARGS, "--out", out)
    wait_for(lambda: (run / rundir.METRICS).exists() and len(_logged_steps(run)) >= 2, proc)
    line = _interrupt(proc)
    assert not (run / rundir.CHECKPOINTS).exists() or not any((run / rundir.CHECKPOINTS).iterdir())
    m = re.fullmatch(r"prefpipe: interrupted at step (\d+) of dpo-beta0\.1; no checkpoint was saved \(pass "
                     r"--save_every N to save them\); rerun the same command with --resume to start this run "
                     r"over \(finished runs are kept\)", line)
    assert m, line
    assert int(m.group(1)) == max(_logged_steps(run)) >= 2


@pytest.mark.slow
def test_interrupted_precompute_counts_the_kept_parts_and_a_rerun_finishes(tmp_path, tiny_model, run_cli):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(3000, seed=5, max_words=12))
    out = tmp_path / "cache"
    args = ["precompute", "--model", tiny_model, "--data", data, "--out", out, "--part_rows", "20", "--dtype",
            "float32", "--device", "cpu", "--no_progress"]
    proc = _start(*args)
    wait_for(lambda: (out / "part-00001.parquet").exists(), proc)
    line = _interrupt(proc)

    m = re.fullmatch(r"prefpipe: interrupted; (\d+) finished parts? kept in (\S+); rerun the same command to "
                     r"continue from them", line)
    assert m, line
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert int(m.group(1)) == len(parts) >= 2 and len(parts) < 150 and Path(m.group(2)) == out
    assert not (out / "manifest.json").exists()

    res = run_cli(*map(str, args))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "manifest.json").read_text())["metadata"]["counts"]["rows_read"] == 3000
    assert f"{len(parts)} reused" in res.output  # the rerun kept the interrupted run's parts


KEEPS = ("finished caches and cache parts are reused; finished runs are kept (dpo-beta0.1); dpo-beta0.2 continues "
         "from its checkpoint step-000002; kto-beta0.3 starts from step 0 (no checkpoint; save_every saves them); "
         "each only while its settings are unchanged (a changed run is trained afresh)")


def _pipeline_runs(runs: Path):
    """Run directories as an interrupted pipeline leaves them: one finished, one with a checkpoint, one without,
    and a run `prefpipe train` made (no pipeline record), which a pipeline rerun does not count as its own."""
    for name in ("dpo-beta0.1", "dpo-beta0.2", "kto-beta0.3", "made-by-train"):
        (runs / name).mkdir(parents=True)
        if name != "made-by-train":
            (runs / name / rundir.PIPELINE_RUN).write_text("{}")
    for name in ("dpo-beta0.1", "made-by-train"):
        (runs / name / rundir.FINAL).mkdir()
        (runs / name / rundir.RESULT).write_text("{}")
    for step in (1, 2):
        ckpt = runs / "dpo-beta0.2" / rundir.CHECKPOINTS / f"step-{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / rundir.TRAINER_STATE).write_bytes(b"")
    (runs / "dpo-beta0.2" / rundir.CHECKPOINTS / "step-000003").mkdir()  # cut short: no trainer state


def test_interrupted_pipeline_says_what_a_rerun_keeps(monkeypatch, run_cli, tmp_path):
    import prefpipe.pipeline.run

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(prefpipe.pipeline.run, "run_pipeline", interrupted)
    _pipeline_runs(tmp_path / "out")
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ndata = "d.jsonl"\nruns_dir = "out"\n')
    res = run_cli("pipeline", "--config", toml, "--beta", "0.2")
    assert res.exit_code == 130
    assert res.stderr.strip() == "prefpipe: interrupted; rerun the same command to continue: " + KEEPS
    # runs_dir on the command line wins over the file's, as in the run itself
    res = run_cli("pipeline", "--config", toml, "--runs_dir", tmp_path / "elsewhere")
    assert res.stderr.strip() == ("prefpipe: interrupted; rerun the same command to continue: finished caches and "
                                  "cache parts are reused; each only while its settings are unchanged (a changed "
                                  "run is trained afresh)")


def test_interrupted_demo_says_what_a_rerun_keeps(monkeypatch, run_cli, tmp_path):
    import prefpipe.demo.run

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(prefpipe.demo.run, "run_demo", interrupted)
    _pipeline_runs(tmp_path / "demo" / "runs")
    res = run_cli("demo", "--out", tmp_path / "demo")
    assert res.exit_code == 130
    assert res.stderr.strip() == ("prefpipe: interrupted; rerun the same command to continue: the SFT model, the "
                                  "pairs, " + KEEPS)


@pytest.mark.slow
def test_sigint_to_a_pipeline_names_the_checkpoint_a_rerun_continues_from(tmp_path, tiny_model):
    write_jsonl(tmp_path / "pairs.jsonl", make_pairs(24, seed=5))
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tiny_model}"\ndata = "pairs.jsonl"\nruns_dir = "runs"\ndevice = "cpu"\n'
                    'dtype = "float32"\nprogress = false\n[precompute]\nmax_length = 96\nmax_prompt_length = 48\n'
                    '[train]\nmax_steps = 5000\nsave_every = 1\nbatch_size = 4\nlr = 1e-3\n')
    run = tmp_path / "runs" / "dpo-beta0.1"
    proc = _start("pipeline", "--config", toml)
    wait_for(lambda: (run / rundir.CHECKPOINTS / "step-000002").exists(), proc)
    line = _interrupt(proc)
    m = re.fullmatch(r"prefpipe: interrupted; rerun the same command to continue: finished caches and cache parts "
                     r"are reused; dpo-beta0\.1 continues from its checkpoint (step-\d+); each only while its "
                     r"settings are unchanged \(a changed run is trained afresh\)", line)
    assert m, line
    saved = sorted(p.name for p in (run / rundir.CHECKPOINTS).iterdir() if (p / rundir.TRAINER_STATE).exists())
    assert m.group(1) == saved[-1] and saved[-1] >= "step-000002"
