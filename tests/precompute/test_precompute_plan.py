"""The plan of phase one (prefpipe.precompute.plan): identity without an engine, one decision for --out."""

from __future__ import annotations

import pytest

from prefpipe.errors import UserError
from prefpipe.options import build
from prefpipe.precompute import plan
from prefpipe.precompute.config import PrecomputeConfig
from prefpipe.precompute.run import run_precompute


def _cfg(tiny_model, data, out, **kw):
    return build(PrecomputeConfig, dict(model=str(tiny_model), data=str(data), out=str(out), device="cpu",
                                        part_rows=10, progress=False, **kw))


def test_the_plan_predicts_the_identity_the_cache_records_and_decides_reuse(tiny_model, pairs_file, tmp_path):
    from prefpipe.data.cache import read_manifest
    from prefpipe.data import identity

    cfg = _cfg(tiny_model, pairs_file, tmp_path / "c", dtype="auto")
    fps = plan.fingerprints(cfg.model)
    before = plan.plan(cfg, cfg.input.dataset(cfg.data), fps)
    assert (before.action, before.expected["dtype"], before.expected["backend"]) == ("compute", "float32", "hf")
    run_precompute(cfg)
    assert identity.identity_of(read_manifest(tmp_path / "c")["metadata"]) == before.expected
    after = plan.plan(cfg, cfg.input.dataset(cfg.data), fps)
    assert after.action == "reuse" and sorted(after.parts().done) == [0, 1, 2]  # 24 rows in parts of 10


def test_a_part_of_another_run_is_refused_before_the_engine_loads(tiny_model, pairs_file, tmp_path, monkeypatch):
    run_precompute(_cfg(tiny_model, pairs_file, tmp_path / "c", max_length=64))
    (tmp_path / "c" / "manifest.json").unlink()  # unfinished

    def no_engine(*a, **k):
        raise AssertionError("the engine was loaded")
    monkeypatch.setattr("prefpipe.precompute.run.make_backend", no_engine)
    with pytest.raises(UserError, match="different run.*max_length: cache 64, now 1024"):
        run_precompute(_cfg(tiny_model, pairs_file, tmp_path / "c"))
