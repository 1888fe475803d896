"""Checkpoints and --resume: a real `prefpipe train` process is SIGKILLed mid-run, after a checkpoint; resuming
gives the same metrics trajectory and the same final weights as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from train_fixtures import one_thread  # noqa: F401  (autouse)
from train_fixtures import TIMING_KEYS, cache, pairs_data, wait_for
from prefpipe import rundir

# 24 steps: after the kill condition (step 6 logged) the child still has 18 steps and 4 checkpoints to go, far
# more than the 5 ms polling interval, so the kill always lands mid-run.
ARGS = ["--lr", "1e-3", "--batch_size", "4", "--max_steps", "24", "--save_every", "4", "--eval_fraction", "0.2",
        "--eval_every", "3", "--warmup_ratio", "0.25", "--lr_scheduler", "cosine", "--seed", "3", "--dtype",
        "float32", "--device", "cpu", "--no_progress"]


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory, tiny_model):
    return cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 24), "pairs24")


def _lines(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run_dir / rundir.METRICS).read_text().splitlines()]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_trajectory_and_weights(tmp_path, tiny_model, pair_cache, run_cli):
    from safetensors.torch import load_file

    common = ["train", "--model", str(tiny_model), "--cache", str(pair_cache), *ARGS]
    res = run_cli(*common, "--out", tmp_path / "straight")
    assert res.exit_code == 0, res.output

    out = tmp_path / "killed"
    run = out / "dpo-beta0.1"
    proc = subprocess.Popen([sys.executable, "-m", "prefpipe", *common, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    # Kill once the step-4 checkpoint is complete (it appears by rename) and the run has logged steps past it,
    # so the resumed run must also drop those lines.
    wait_for(lambda: (run / rundir.CHECKPOINTS / "step-000004").exists() and (run / rundir.METRICS).exists()
              and any(r["step"] >= 6 for r in _lines(run)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / rundir.FINAL).exists()
    killed_at = max(r["step"] for r in _lines(run))
    assert 6 <= killed_at < 24

    state = torch.load(run / rundir.CHECKPOINTS / "step-000004" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and "optimizer" in state and "rng" in state

    res = run_cli(*common, "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert "resuming after step" in res.stderr

    straight = _lines(tmp_path / "straight" / "dpo-beta0.1")
    resumed = _lines(run)
    assert [r["step"] for r in resumed if r["split"] == "train"] == list(range(1, 25))
    assert len(resumed) == len(straight)
    for a, b in zip(straight, resumed):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-6), (k, a, b)

    wa = load_file(tmp_path / "straight" / "dpo-beta0.1" / rundir.FINAL / "model.safetensors")
    wb = load_file(run / rundir.FINAL / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    sft = load_file(tiny_model / "model.safetensors")
    assert max(float((wa[k] - sft[k]).abs().max()) for k in wa) > 1e-3  # training moved the weights
