"""`generate --engine ray` on a local Ray instance with 2 CPU actors: the output equals the local engine's (same
per-part seeds), a python judge is found from the driver's working directory, and a rerun resumes."""

from __future__ import annotations

import importlib.util
import os

import pyarrow.parquet as pq
import pytest

from helpers import write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_up():
    if importlib.util.find_spec("ray") is None:
        if os.environ.get("PREFPIPE_REQUIRE_RAY"):
            pytest.fail("PREFPIPE_REQUIRE_RAY is set but Ray is not importable")
        pytest.skip("Ray is not installed (pip install 'prefpipe[ray]')")
    import ray
    ray.init(num_cpus=4, object_store_memory=200 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _parts(out):
    return [pq.read_table(p).to_pylist() for p in sorted((out / "samples").glob("part-*.parquet"))]


def test_ray_equals_local_and_resumes(ray_up, run_cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "judge_mod.py").write_text("def length(prompt, completion, row):\n    return len(completion)\n")
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Count to {i}"} for i in range(7)])
    common = ("--model", tiny_model, "--data", data, "--reward", "python:judge_mod:length", "--num_samples", "3",
              "--max_new_tokens", "6", "--part_rows", "2")
    r = run_cli("generate", *common, "--out", tmp_path / "local")
    assert r.exit_code == 0, r.output
    r = run_cli("generate", *common, "--out", tmp_path / "ray", "--engine", "ray", "--ray_workers", "2")
    assert r.exit_code == 0, r.output
    assert _parts(tmp_path / "ray") == _parts(tmp_path / "local")
    assert pq.read_table(tmp_path / "ray" / "pairs.parquet").to_pylist() == \
        pq.read_table(tmp_path / "local" / "pairs.parquet").to_pylist()
    (tmp_path / "ray" / "samples" / "part-00003.parquet").unlink()
    (tmp_path / "ray" / "manifest.json").unlink()
    r = run_cli("generate", *common, "--out", tmp_path / "ray", "--engine", "ray", "--ray_workers", "2")
    assert r.exit_code == 0 and "3 reused" in r.output
    assert _parts(tmp_path / "ray") == _parts(tmp_path / "local")
