"""Resume after a killed run, torchrun with 2 CPU ranks, and --shard: each must equal one uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import make_pairs, write_jsonl
from prefpipe.data.cache import MANIFEST, read_cache

pytestmark = pytest.mark.slow
PART_ROWS = 2


def dataset(path: Path) -> Path:
    rows = make_pairs(36, seed=1)
    rows.insert(5, {"prompt": "Q: x", "chosen": "same", "rejected": "same"})  # skipped, in part 2
    rows.append(dict(rows[0]))  # duplicate of a row in part 0, found in the last part
    return write_jsonl(path, rows)  # 38 rows, 19 parts


def args(model, data, out, *extra):
    return ["precompute", "--model", str(model), "--data", str(data), "--out", str(out), "--part_rows",
            str(PART_ROWS), "--batch_tokens", "512", "--no_progress", *extra]


def assert_same_cache(a: Path, b: Path):
    ca, cb = read_cache(a), read_cache(b)
    ta, tb = ca.table.to_pydict(), cb.table.to_pydict()
    for col in ("row_id", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_len", "rejected_len"):
        assert ta[col] == tb[col], col
    for col in ("ref_chosen", "ref_rejected"):
        assert all(abs(x - y) <= 1e-5 * max(1.0, abs(y) / 100) for x, y in zip(ta[col], tb[col])), col
    ma, mb = ca.metadata, cb.metadata
    assert ma["counts"] == mb["counts"]
    strip = ("created_at", "counts", "model", "data")
    assert {k: v for k, v in ma.items() if k not in strip} == {k: v for k, v in mb.items() if k not in strip}
    assert ma["model"]["fingerprint"] == mb["model"]["fingerprint"]
    assert ma["data"]["fingerprint"] == mb["data"]["fingerprint"]
    ja, jb = (json.loads((d / MANIFEST).read_text())["parts"] for d in (a, b))
    # Each part's digest covers its values, not its bytes (which hold its creation time): all must be equal.
    assert ja == jb and all("content_sha256" in p for p in ja)


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory):
    """The uninterrupted single-process run everything else is compared with."""
    from click.testing import CliRunner

    from prefpipe.cli import cli
    d = tmp_path_factory.mktemp("resume")
    data = dataset(d / "data.jsonl")
    res = CliRunner().invoke(cli, args(tiny_model, data, d / "whole"), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    counts = read_cache(d / "whole").metadata["counts"]
    assert counts["rows_read"] == 38 and counts["skipped"] == {"chosen_equals_rejected": 1}
    assert counts["duplicates"] == 1
    return data, d / "whole"


def test_killed_run_resumes_to_the_same_cache(reference_run, tiny_model, tmp_path, run_cli):
    data, whole = reference_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "prefpipe", *args(tiny_model, data, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(list(out.glob("part-*.parquet"))) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    finished = len(list(out.glob("part-*.parquet")))
    assert 2 <= finished < 19 and not (out / MANIFEST).exists()
    res = run_cli("inspect", out)
    assert res.exit_code == 2 and "manifest.json is missing" in res.output

    res = run_cli(*args(tiny_model, data, out))
    assert res.exit_code == 0, res.output
    assert f"{19 - finished} written now, {finished} reused" in res.output
    assert not list(out.glob(".part-*"))  # a temp file the kill left behind is cleaned up
    assert_same_cache(out, whole)


def test_torchrun_two_cpu_ranks_equal_one_process(reference_run, tiny_model, tmp_path):
    data, whole = reference_run
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "prefpipe",
                          *args(tiny_model, data, out, "--device", "cpu")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("rows:") == 1  # only rank 0 prints the summary
    assert "19 written now, 0 reused" in res.stdout
    # Part i was written by rank i % 2; each carries its own counts, which the manifest summed.
    parts = [json.loads(pq.read_schema(p).metadata[b"prefpipe"])["part"] for p in sorted(out.glob("part-*.parquet"))]
    assert [p["index"] for p in parts] == list(range(19))
    assert_same_cache(out, whole)


def test_shards_as_independent_processes(reference_run, tiny_model, tmp_path, run_cli):
    data, whole = reference_run
    out = tmp_path / "shards"
    res = run_cli(*args(tiny_model, data, out, "--shard", "1/2"))
    assert res.exit_code == 0, res.output
    assert "shard done: 9 parts written" in res.output and not (out / MANIFEST).exists()
    assert sorted(int(p.stem[5:]) for p in out.glob("part-*.parquet")) == list(range(1, 19, 2))
    res = run_cli(*args(tiny_model, data, out, "--shard", "0/2"))
    assert res.exit_code == 0, res.output
    assert "10 written now" in res.output and (out / MANIFEST).exists()
    assert_same_cache(out, whole)
