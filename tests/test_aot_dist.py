"""aot sorts log-ratios over the micro-batch (TRL's definition), so under torchrun its loss depends on --batch_size
only: 2 processes x batch 2 give the same step-1 loss as 1 process x batch 2 x 2 accumulation (the same two
micro-batches of the same global batch of 4; see `micro_batches`: micro-batch k of process r holds rows
[(k*world + r)*bs, ...) of the step's global batch), and a different one from 1 process x batch 4 (one micro-batch
of 4 sorted together).

With a cache made from the policy itself every step-1 log-ratio is 0 and sorting cannot matter, so the cache is
made from another random tiny Llama (same tokenizer, init seed 1; `--allow_reference_mismatch`, drift check off):
the step-1 log-ratios then spread over a few nats, and sorting 2 by 2 pairs them differently than sorting 4
together (asserted below)."""

import os
import subprocess
import sys

import pytest

from test_train_fixtures import one_thread  # noqa: F401  (autouse)
from test_train_fixtures import cache, metrics, pairs_data

ATOL = 1e-5
COMMON = ["--loss_type", "aot", "--beta", "0.5", "--lr", "1e-3", "--max_steps", "2", "--warmup_ratio", "0",
          "--allow_reference_mismatch", "--drift_rows", "0", "--dtype", "float32", "--device", "cpu", "--no_progress"]


def prefpipe_train(*args, procs=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    cmd = [sys.executable, *launcher, "-m", "prefpipe", "train", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory):
    from prefpipe.tiny import build_tiny
    other = build_tiny(tmp_path_factory.mktemp("tiny-llama-seed1"), seed=1)
    return cache(tmp_path_factory, other, pairs_data(tmp_path_factory, 8), "pairs8-seed1-model")


@pytest.mark.slow
def test_ddp_aot_sorts_each_process_micro_batch(tmp_path, tiny_model, other_cache):
    base = ["--model", tiny_model, "--cache", other_cache, *COMMON]
    proc = prefpipe_train(*base, "--batch_size", 2, "--out", tmp_path / "ddp", procs=2)
    assert "ddp on 2 process(es)" in proc.stderr
    prefpipe_train(*base, "--batch_size", 2, "--grad_accum", 2, "--out", tmp_path / "accum")
    prefpipe_train(*base, "--batch_size", 4, "--out", tmp_path / "whole")
    ddp, accum, whole = (metrics(tmp_path / d / "aot-beta0.5") for d in ("ddp", "accum", "whole"))
    assert [r["examples"] for r in ddp] == [4, 4]  # the logged count is the global batch's
    assert ddp[0]["loss"] == pytest.approx(accum[0]["loss"], abs=ATOL)
    assert ddp[1]["loss"] == pytest.approx(accum[1]["loss"], abs=ATOL)
    # sorting the 4 rows together pairs the log-ratios differently: the data makes the definitions differ
    assert abs(whole[0]["loss"] - ddp[0]["loss"]) > 1e-2
