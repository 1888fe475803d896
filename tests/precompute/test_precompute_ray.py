"""`precompute --engine ray` on a local Ray instance (one per module) with 2 CPU actors: the cache equals the
single-process one, resumes after Ctrl-C or a killed driver, survives a killed actor, refuses a foreign part, and
fails in one line when an actor cannot load the model. `generate --engine ray` on the same instance: its output
equals the local engine's (same per-part seeds), a python judge is found from the driver's working directory, and a
rerun resumes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import make_pairs, one_line_error, write_jsonl
from prefpipe.data.cache import MANIFEST, read_cache

pytestmark = pytest.mark.slow  # every test that starts Ray skips (in its fixture) without it
PART_ROWS = 4


@pytest.fixture(scope="module")
def ray_address():
    """One local instance for the module (starting one costs 20-30 s): 4 logical CPUs, so that two 1-CPU actors
    never wait for each other, and a small object store. Token authentication off, so that a CLI process can join
    it with --ray_address."""
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("PREFPIPE_REQUIRE_RAY"):  # CI installs the extra: a failed install must not pass as a skip
            pytest.fail("PREFPIPE_REQUIRE_RAY is set but Ray is not importable")
        pytest.skip("Ray is not installed (pip install 'prefpipe[ray]')")
    import ray
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ctx = ray.init(num_cpus=4, object_store_memory=200 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
    yield ctx.address_info["address"]
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    rows = make_pairs(30, seed=3)
    rows.insert(6, {"prompt": "Q: x", "chosen": "same", "rejected": "same"})  # skipped, in part 1
    rows.append(dict(rows[0]))  # a duplicate of part 0's first row, counted in the last part
    return write_jsonl(tmp_path_factory.mktemp("ray-data") / "pairs.jsonl", rows)  # 32 rows, 8 parts


def args(model, data, out, *extra):
    return ["precompute", "--model", model, "--data", data, "--out", out, "--part_rows", PART_ROWS,
            "--batch_tokens", 512, "--per_token", *extra]


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    """Single-process caches (local engine), paired and KTO, that every Ray run is compared with."""
    from click.testing import CliRunner

    from prefpipe.cli import cli
    d = tmp_path_factory.mktemp("ray-ref")
    out = {}
    for kind, extra in (("paired", ()), ("kto", ("--kto",))):
        res = CliRunner().invoke(cli, [str(a) for a in args(tiny_model, data, d / kind, "--no_progress", *extra)],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
        out[kind] = d / kind
    return out


def assert_same_cache(a: Path, b: Path):
    ca, cb = read_cache(a), read_cache(b)
    ta, tb = ca.table.to_pydict(), cb.table.to_pydict()
    assert list(ta) == list(tb)
    floats = set(ca.spec.ref_columns)
    tokens = set(ca.spec.token_columns)
    for col in ta:
        if col in floats:
            assert all(abs(x - y) <= 1e-6 for x, y in zip(ta[col], tb[col], strict=True)), col
        elif col in tokens:
            assert all(len(x) == len(y) and all(abs(u - v) <= 1e-6 for u, v in zip(x, y))
                       for x, y in zip(ta[col], tb[col], strict=True)), col
        else:
            assert ta[col] == tb[col], col
    strip = ("created_at", "model", "data")
    ma, mb = ca.metadata, cb.metadata
    assert {k: v for k, v in ma.items() if k not in strip} == {k: v for k, v in mb.items() if k not in strip}
    assert ma["model"]["fingerprint"] == mb["model"]["fingerprint"]
    ja, jb = (json.loads((d / MANIFEST).read_text())["parts"] for d in (a, b))
    assert [(p["file"], p["rows"], p["identity"]) for p in ja] == [(p["file"], p["rows"], p["identity"]) for p in jb]


@pytest.mark.parametrize("kind", ["paired", "kto"])
def test_two_actors_write_the_single_process_cache(ray_address, reference, tiny_model, data, tmp_path, run_cli,
                                                   kind):
    out = tmp_path / kind
    extra = ("--kto",) if kind == "kto" else ()
    res = run_cli(*args(tiny_model, data, out, "--engine", "ray", "--ray_workers", 2, *extra))  # progress bar on
    assert res.exit_code == 0, res.output
    assert "8 parts; 8 written now, 0 reused" in res.output
    assert "precompute (2 ray actors)" in res.stderr and "32/32" in res.stderr  # one bar, with the total
    assert_same_cache(out, reference[kind])
    counts = read_cache(out).metadata["counts"]
    assert counts["rows_read"] == 32 and counts["duplicates"] == 1
    assert counts["skipped"] == {"chosen_equals_rejected": 1}
    res = run_cli("inspect", out)
    assert res.exit_code == 0, res.output


def test_the_driver_neither_tokenizes_nor_scores(ray_address, reference, tiny_model, data, tmp_path, run_cli,
                                                monkeypatch):
    """Tokenizing and scoring run in the plan's actors (other processes): broken in the driver, the run still
    writes the single-process cache. With the default options (the progress bar on), as a user runs it."""
    from prefpipe.data.tokenize import PairTokenizer
    from prefpipe.precompute import run

    def broken(*a, **k):
        raise AssertionError("the driver tokenized or loaded a backend")
    monkeypatch.setattr(PairTokenizer, "tokenize", broken)
    monkeypatch.setattr(run, "make_backend", broken)
    out = tmp_path / "c"
    res = run_cli(*args(tiny_model, data, out, "--engine", "ray", "--ray_workers", 2))  # defaults: the bar on
    assert res.exit_code == 0, res.output
    assert_same_cache(out, reference["paired"])


def test_killed_actor_is_replaced_and_its_part_rescored(ray_address, reference, tiny_model, data, tmp_path,
                                                        run_cli, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("PREFPIPE_RAY_TEST_CRASH", f"3:{marker}")  # the actor given part 3 exits hard, once
    out = tmp_path / "c"
    res = run_cli(*args(tiny_model, data, out, "--engine", "ray", "--ray_workers", 2, "--no_progress"))
    assert res.exit_code == 0, res.output
    assert marker.exists(), "the actor never crashed"
    assert "8 written now" in res.output
    assert_same_cache(out, reference["paired"])


def test_a_part_that_keeps_failing_stops_the_run_in_one_line(ray_address, tiny_model, data, tmp_path, run_cli,
                                                            monkeypatch):
    monkeypatch.setenv("PREFPIPE_RAY_TEST_CRASH", "5:")  # the actor dies on part 5 every time: Ray gives up
    res = run_cli(*args(tiny_model, data, tmp_path / "c", "--engine", "ray", "--ray_workers", 2, "--no_progress"))
    one_line_error(res, "part 5 failed on actor", "pid")
    assert not (tmp_path / "c" / MANIFEST).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_driver_resumes(ray_address, tiny_model, tmp_path, run_cli, sig):
    rows = make_pairs(120, seed=4)  # 60 parts of 2: enough that the run is still going when it is stopped
    data = write_jsonl(tmp_path / "many.jsonl", rows)
    whole, out = tmp_path / "whole", tmp_path / "stopped"
    cmd = ["--part_rows", 2, "--no_progress"]
    res = run_cli(*args(tiny_model, data, whole, *cmd))
    assert res.exit_code == 0, res.output
    ray_args = [str(a) for a in args(tiny_model, data, out, *cmd, "--engine", "ray", "--ray_workers", 2,
                                     "--ray_address", ray_address)]
    proc = subprocess.Popen([sys.executable, "-m", "prefpipe", *ray_args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and len(list(out.glob("part-*.parquet"))) >= 2:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), err
    if sig == signal.SIGINT:
        assert err.strip().splitlines()[-1].startswith("prefpipe: "), err
    time.sleep(1)  # a killed driver's actors may still finish the part they hold
    finished = len(list(out.glob("part-*.parquet")))
    assert 2 <= finished < 60 and not (out / MANIFEST).exists()

    res = run_cli(*ray_args)  # in this process: the module's instance
    assert res.exit_code == 0, res.output
    assert f"{60 - finished} written now, {finished} reused" in res.output
    assert not list(out.glob(".part-*"))
    a, b = read_cache(out).table, read_cache(whole).table
    assert a.column("row_id").to_pylist() == b.column("row_id").to_pylist()
    assert max(abs(x - y) for x, y in zip(a.column("ref_chosen").to_pylist(), b.column("ref_chosen").to_pylist())) \
        <= 1e-6


def test_part_from_another_run_is_refused(ray_address, tiny_model, data, tmp_path, run_cli):
    other = tmp_path / "other"
    res = run_cli(*args(tiny_model, data, other, "--no_progress", "--max_length", 64))
    assert res.exit_code == 0, res.output
    out = tmp_path / "c"
    out.mkdir()
    shutil.copy(other / "part-00002.parquet", out)
    res = run_cli(*args(tiny_model, data, out, "--engine", "ray", "--ray_workers", 2, "--no_progress"))
    one_line_error(res, "part-00002.parquet", "a cache part from a different run",
                   "max_length: cache 64, now 1024")
    local = run_cli(*args(tiny_model, data, out, "--no_progress"))  # the local engine says the same
    assert one_line_error(local) == one_line_error(res)


def test_actor_that_cannot_load_the_model_fails_in_one_line(ray_address, tiny_model, data, tmp_path, run_cli):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # the driver's tokenizer still loads
    t0 = time.time()
    res = run_cli(*args(broken, data, tmp_path / "c", "--engine", "ray", "--ray_workers", 2, "--no_progress"))
    one_line_error(res, "could not load the model")
    assert time.time() - t0 < 60
    assert not list((tmp_path / "c").glob("part-*"))


def test_joining_a_cluster_needs_an_absolute_out(tiny_model, data, run_cli):
    res = run_cli(*args(tiny_model, data, "relative/cache", "--engine", "ray", "--ray_address", "auto"))
    one_line_error(res, "--out must be an absolute path", "--ray_address")


def test_without_ray_engine_ray_is_one_line_with_the_install_command(tiny_model, data, tmp_path, run_cli,
                                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    res = run_cli(*args(tiny_model, data, tmp_path / "c", "--engine", "ray"))
    one_line_error(res, "--engine ray needs Ray", "pip install 'prefpipe[ray]'")
    assert not (tmp_path / "c").exists()


def _sample_parts(out):
    return [pq.read_table(p).to_pylist() for p in sorted((out / "samples").glob("part-*.parquet"))]


def test_generate_on_ray_equals_local_and_resumes(ray_address, run_cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "judge_mod.py").write_text("def length(prompt, completion, row):\n    return len(completion)\n")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Count to {i}"} for i in range(7)])
    common = ("--model", tiny_model, "--data", data, "--reward", "python:judge_mod:length", "--num_samples", "3",
              "--max_new_tokens", "6", "--part_rows", "2")
    r = run_cli("generate", *common, "--out", tmp_path / "local")
    assert r.exit_code == 0, r.output
    r = run_cli("generate", *common, "--out", tmp_path / "ray", "--engine", "ray", "--ray_workers", "2")
    assert r.exit_code == 0, r.output
    assert _sample_parts(tmp_path / "ray") == _sample_parts(tmp_path / "local")
    assert pq.read_table(tmp_path / "ray" / "pairs.parquet").to_pylist() == \
        pq.read_table(tmp_path / "local" / "pairs.parquet").to_pylist()
    (tmp_path / "ray" / "samples" / "part-00003.parquet").unlink()
    (tmp_path / "ray" / "manifest.json").unlink()
    r = run_cli("generate", *common, "--out", tmp_path / "ray", "--engine", "ray", "--ray_workers", "2")
    assert r.exit_code == 0 and "3 reused" in r.output
    assert _sample_parts(tmp_path / "ray") == _sample_parts(tmp_path / "local")


def test_the_reader_serves_parts_in_any_order_with_the_in_order_counts(data):
    """Ray Data may ask the reader for parts out of order: each part still gets its own records, the part before
    it (a KTO partner's source) and its duplicates counted against every earlier row; a finished part is read
    past, not served. No Ray needed: the stage is a plain class."""
    import pickle

    import numpy as np

    from prefpipe.data.settings import InputSettings
    from prefpipe.precompute.ray_engine import Reader

    ds = InputSettings().dataset(data, batch_rows=PART_ROWS)
    ds.validate()
    parts = [[r.row for r in records] for records in ds.batches()]
    assert len(parts) == 8
    reader = Reader(ds, done={1}, kto=True)

    def ask(i):
        ok, value = pickle.loads(reader({"index": np.array([i])})["blob"][0])
        return ok, value

    ok, (records, prev, duplicates) = ask(7)  # the fixture's last row repeats part 0's first
    assert ok and [r.row for r in records] == parts[7] and [r.row for r in prev] == parts[6] and duplicates == 1
    ok, (records, prev, duplicates) = ask(0)
    assert ok and [r.row for r in records] == parts[0] and prev is None and duplicates == 0
    ok, (records, prev, duplicates) = ask(2)  # the part before it (1) is finished, yet still its partner source
    assert ok and [r.row for r in records] == parts[2] and [r.row for r in prev] == parts[1] and duplicates == 0
    ok, message = ask(8)
    assert not ok and "ended before part 8" in message
