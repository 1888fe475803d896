"""Output locks: a second writer into one --out is refused with one line, in real concurrent processes."""

from __future__ import annotations

from prefpipe.options import build

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from prefpipe.errors import UserError
from prefpipe.fileio import LOCK_FILE, OutputLock
from train_fixtures import one_thread, pairs_data  # noqa: F401 (one_thread: autouse fixture)
from prefpipe import rundir

REPO = Path(__file__).resolve().parents[1]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def holder(directory: Path, *locks: tuple[str, bool]) -> subprocess.Popen:
    """Another process holding OutputLocks (name, shared) on `directory` until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from prefpipe.fileio import OutputLock
        held = [OutputLock({str(directory)!r}, "test", name=n, shared=s).acquire() for n, s in {list(locks)!r}]
        print("held", flush=True)
        sys.stdin.read()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env(),
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def release(p: subprocess.Popen):
    p.stdin.close()
    assert p.wait(timeout=60) == 0


def test_second_process_is_refused_and_lock_dies_with_its_holder(tmp_path):
    p = holder(tmp_path, (LOCK_FILE, False))
    try:
        with pytest.raises(UserError, match=rf"in use by another prefpipe command \(pid {p.pid} "):
            OutputLock(tmp_path, "--out x").acquire()
        with pytest.raises(UserError, match="in use"):
            OutputLock(tmp_path, "--out x", shared=True).acquire()
    finally:
        p.kill()
        p.wait()
    with OutputLock(tmp_path, "--out x"):  # the kernel dropped the dead holder's lock
        pass


def test_same_process_reacquires_without_deadlock(tmp_path):
    outer = OutputLock(tmp_path, "RUNS_DIR").acquire()
    with OutputLock(tmp_path / ".", "--out"):  # another spelling of the same directory
        pass
    p = subprocess.run([sys.executable, "-c", f"from prefpipe.fileio import OutputLock; "
                        f"OutputLock({str(tmp_path)!r}, 'x').acquire()"], env=env(), capture_output=True, text=True)
    assert p.returncode != 0 and "in use by another prefpipe command" in p.stderr  # still held by `outer`
    outer.release()
    p = subprocess.run([sys.executable, "-c", f"from prefpipe.fileio import OutputLock; "
                        f"OutputLock({str(tmp_path)!r}, 'x').acquire()"], env=env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_shards_share_the_cache_but_not_a_shard(tmp_path):
    p = holder(tmp_path, (LOCK_FILE, True), (f"{LOCK_FILE}.shard-0-of-2", False))
    try:
        with OutputLock(tmp_path, "--out", shared=True), \
                OutputLock(tmp_path, "--out", name=f"{LOCK_FILE}.shard-1-of-2"):
            pass
        with pytest.raises(UserError, match="in use"):
            OutputLock(tmp_path, "--out", name=f"{LOCK_FILE}.shard-0-of-2").acquire()
        with pytest.raises(UserError, match="in use"):
            OutputLock(tmp_path, "--out").acquire()  # a plain precompute while shards run
    finally:
        release(p)


def test_precompute_into_a_locked_cache_is_refused(tmp_path, tiny_model, tmp_path_factory):
    from prefpipe.precompute.run import PrecomputeConfig, run_precompute
    data = pairs_data(tmp_path_factory)
    out = tmp_path / "cache"

    def cfg(**kw):
        return build(PrecomputeConfig, dict(model=str(tiny_model), data=str(data), out=str(out), dtype="float32",
                                device="cpu", progress=False, **kw))
    p = holder(out, (LOCK_FILE, False))
    try:
        for kw in ({}, {"shard": "1/2"}):
            with pytest.raises(UserError, match="in use by another prefpipe command"):
                run_precompute(cfg(**kw))
        assert sorted(f.name for f in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        release(p)
    p = holder(out, (LOCK_FILE, True), (f"{LOCK_FILE}.shard-0-of-2", False))
    try:
        with pytest.raises(UserError, match=r"shard 0/2\) is in use"):
            run_precompute(cfg(shard="0/2"))
        s = run_precompute(cfg(shard="1/2", part_rows=8))  # the other shard runs beside it: part 1 of 0..2
        assert s["parts_written"] == 1 and not s["finalised"]
    finally:
        release(p)


def test_concurrent_train_into_one_out(tmp_path, tiny_model, tmp_path_factory):
    """Two real `prefpipe train` processes: the second exits 2 with one line; the first finishes untouched."""
    data = pairs_data(tmp_path_factory)
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "prefpipe", "train", "--model", str(tiny_model), "--data", str(data),
           "--loss_type", "orpo", "--out", str(out), "--batch_size", "2", "--device", "cpu", "--no_progress"]
    first = subprocess.Popen(cmd + ["--max_steps", "400"], env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "orpo" / rundir.METRICS).exists():  # it has started writing its run
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline
            time.sleep(0.2)
        second = subprocess.run(cmd + ["--max_steps", "2", "--loss_type", "sft"], env=env(), capture_output=True,
                                text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused; raise --max_steps"
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"prefpipe: error: file {out}: --out is in use by another prefpipe command "
                          f"(pid {first.pid} ")
    assert first.returncode == 0, stderr
    assert not (out / "sft").exists()  # the refused run wrote nothing
    lines = (out / "orpo" / rundir.METRICS).read_text().splitlines()
    assert len(lines) == 400
    import json
    assert [r["name"] for r in json.loads((out / rundir.SUMMARY).read_text())["runs"]] == ["orpo"]


def test_summary_merge_is_refused_while_another_process_holds_runs_dir(tmp_path):
    from prefpipe.rundir import RunsDir, merge_summary
    (tmp_path / rundir.SUMMARY).write_text('{"runs": [{"name": "a"}]}')
    p = holder(tmp_path, (LOCK_FILE, False))
    try:
        with pytest.raises(UserError, match="in use"):
            merge_summary(RunsDir(tmp_path), {"runs": [{"name": "b"}]})
    finally:
        release(p)
    merge_summary(RunsDir(tmp_path), {"runs": [{"name": "b"}]})
    import json
    assert [r["name"] for r in json.loads((tmp_path / rundir.SUMMARY).read_text())["runs"]] == ["a", "b"]
