"""Fixtures and helpers of the training tests (tests/train/), shared with the other tests that need a cache or a
training run; imported as a module like helpers.py.

Caches are built once per test session under the session's base temp dir with the real `run_precompute`
(float32, CPU), and reused by name across test modules.
"""

from __future__ import annotations

from prefpipe.options import build

import json
import time
from pathlib import Path

import pytest

from helpers import make_pairs, make_unpaired, write_jsonl
from prefpipe import rundir


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones (measured here: 0.7 s
    against 5.6 s for a 10-step run on a busy 2-core machine). Imported into each train test module."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shared_dir(tmp_path_factory, name: str) -> Path:
    return tmp_path_factory.getbasetemp() / "train-shared" / name


def pairs_data(tmp_path_factory, n: int = 24) -> Path:
    p = shared_dir(tmp_path_factory, f"pairs{n}.jsonl")
    if not p.exists():
        write_jsonl(p, make_pairs(n, seed=7, max_words=16))
    return p


def unpaired_data(tmp_path_factory, n: int = 24) -> Path:
    p = shared_dir(tmp_path_factory, f"unpaired{n}.jsonl")
    if not p.exists():
        write_jsonl(p, make_unpaired(n, seed=8, max_words=16))
    return p


def cache(tmp_path_factory, model: Path, data: Path, name: str, **kw) -> Path:
    from prefpipe.precompute.run import PrecomputeConfig, run_precompute
    out = shared_dir(tmp_path_factory, name)
    if not (out / "manifest.json").exists():
        run_precompute(build(PrecomputeConfig, dict(model=str(model), data=str(data), out=str(out), dtype="float32",
                                        device="cpu", progress=False, **kw)))
    return out


def train(out: Path, model: Path, *, cache=None, data=None, loss_types=("dpo",), betas=(0.1,), reference="cached",
          lr=1e-3, batch_size=4, grad_accum=1, max_steps=6, seed=0, warmup_ratio=0.0, eval_fraction=0.0,
          save_every=0, resume=False, gradient_checkpointing=False, loss_kw=None, source_kw=None,
          padding_free=True, **kw):
    """run_training with small defaults: a constant-ish lr high enough to move a tiny model in a few steps."""
    from prefpipe.train.config import LoopConfig, LossConfig, OptimConfig, SourceConfig, TrainConfig
    from prefpipe.train.loop import run_training
    cfg = TrainConfig(
        source=SourceConfig(model=str(model), cache=str(cache) if cache else None, data=str(data) if data else None,
                            reference=reference, **(source_kw or {})),
        out=str(out), loss_types=tuple(loss_types), betas=tuple(betas), loss=LossConfig(**(loss_kw or {})),
        optim=OptimConfig(lr=lr, warmup_ratio=warmup_ratio, lr_scheduler=kw.pop("lr_scheduler", "linear")),
        loop=LoopConfig(batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, seed=seed,
                        eval_fraction=eval_fraction, save_every=save_every, resume=resume,
                        gradient_checkpointing=gradient_checkpointing, padding_free=padding_free),
        dtype="float32", device="cpu", progress=False, **kw)
    return run_training(cfg)


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / rundir.METRICS).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


TIMING_KEYS = ("tokens_per_s", "step_time_s")


def trajectory(run_dir: Path, keys=("loss", "acc", "r_chosen", "r_rejected", "margin", "grad_norm", "lr", "kl")):
    """Per train step, the values of `keys` (None where absent)."""
    return [[r.get(k) for k in keys] for r in metrics(run_dir)]


def assert_trajectories_close(a, b, atol):
    assert len(a) == len(b) and len(a) > 0
    for step, (ra, rb) in enumerate(zip(a, b), start=1):
        for x, y in zip(ra, rb):
            if x is None or y is None:
                assert x is None and y is None, f"step {step}: {ra} vs {rb}"
            else:
                assert abs(x - y) <= atol * max(1.0, abs(x)), f"step {step}: {ra} vs {rb}"


def wait_for(predicate, proc, timeout=240):
    """Poll `predicate` while the subprocess `proc` runs; fail when it ends first or after `timeout` seconds."""
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the training process ended (rc {proc.returncode}) before it could be killed:\n"
                        + proc.stderr.read().decode()[-3000:])
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the first checkpoint")
        time.sleep(0.005)
