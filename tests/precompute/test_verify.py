"""`--verify K`: rescoring cached rows in float32 catches tampered sums, a wrong model and a wrong tokenizer."""

from __future__ import annotations

from prefpipe.options import build

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from helpers import make_pairs, make_unpaired, write_jsonl
from prefpipe.data.cache import read_cache, read_part_metadata, write_part
from prefpipe.errors import UserError
from prefpipe.precompute.run import PrecomputeConfig, run_precompute
from prefpipe.precompute.verify import TOLERANCES, VerifyFailed, verify_cache

SETTINGS = dict(max_length=96, max_prompt_length=32, part_rows=8, device="cpu", progress=False)


@pytest.fixture(scope="module")
def caches(tiny_model, tmp_path_factory):
    """Float32 paired, bf16 paired and float32 KTO caches from the hf backend (16 pairs, 12 KTO examples)."""
    torch.set_flush_denormal(True)
    d = tmp_path_factory.mktemp("verify")
    pairs = write_jsonl(d / "pairs.jsonl", make_pairs(16, seed=5))
    unpaired = write_jsonl(d / "unpaired.jsonl", make_unpaired(12, seed=5))
    out = {}
    for name, data, dtype in (("f32", pairs, "float32"), ("bf16", pairs, "bfloat16"), ("kto", unpaired, "float32")):
        run_precompute(build(PrecomputeConfig, dict(model=str(tiny_model), data=str(data), out=str(d / name), dtype=dtype,
                                        **SETTINGS)))
        out[name] = d / name
    out["pairs"] = pairs
    return out


def reseal(cache: Path, part: Path):
    """Record the rewritten part's digest in the manifest, as if the engine had written these numbers."""
    import json

    from prefpipe.data.cache import part_digest
    manifest = json.loads((cache / "manifest.json").read_text())
    for p in manifest["parts"]:
        if p["file"] == part.name:
            p["content_sha256"] = part_digest(part, manifest["metadata"]["kind"])
    (cache / "manifest.json").write_text(json.dumps(manifest))


def tamper(cache: Path, column: str, row: int, delta: float) -> tuple[str, int]:
    """Add `delta` to one cached sum (row index across parts), keeping the part's metadata; returns its row id and
    response length."""
    for part in sorted(cache.glob("part-*.parquet")):
        t = pq.read_table(part)
        if row < t.num_rows:
            cols = t.to_pydict()
            cols[column][row] += delta
            meta = read_part_metadata(part)
            write_part(part, cols, meta["kind"], meta)
            reseal(cache, part)
            ids_col = {"ref_chosen": "chosen_ids", "ref_rejected": "rejected_ids", "ref_logp": "completion_ids",
                       "ref_kl": "kl_completion_ids"}[column]
            return cols["row_id"][row], len(cols[ids_col][row])
        row -= t.num_rows
    raise IndexError(row)


def test_float32_cache_passes_with_float32_sized_drift(caches, tiny_model):
    r = verify_cache(str(caches["f32"]), str(tiny_model), 100)
    assert r["passed"] and r["rows"] == 16 and r["sequences"] == 32  # K above the row count checks every row
    assert r["cache"] == {"backend": "hf", "version": r["cache"]["version"], "dtype": "float32"}
    assert r["tolerance"] == {"per_token": 1e-3, "per_sum": 0.05}
    # The same float32 forward twice: only the cache's float32 accumulation of the sum differs.
    assert r["per_token"]["max"] < 1e-5 and r["per_sum"]["max"] < 1e-3
    assert r["model_matches"] and r["tokenizer_matches"]


def test_a_tampered_sum_is_reported_with_its_size_and_fails(caches, tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(caches["f32"], bad)
    row_id, n = tamper(bad, "ref_chosen", 11, 0.5)  # row 11 sits in the second part
    with pytest.raises(VerifyFailed) as e:
        verify_cache(str(bad), str(tiny_model), 16)
    r = e.value.report
    assert r["failing"] == 1
    assert r["worst"]["row_id"] == row_id and r["worst"]["response"] == "chosen"
    assert abs(r["per_sum"]["max"] - 0.5) < 1e-3  # the offset we added, and nothing else of that size
    assert abs(r["worst"]["per_token"] - 0.5 / n) < 1e-3 / n
    assert row_id in str(e.value) and "float32 tolerance" in str(e.value)


def test_an_offset_below_both_limits_passes(caches, tiny_model, tmp_path):
    ok = tmp_path / "ok"
    shutil.copytree(caches["f32"], ok)
    lens = [len(x) for x in read_cache(ok).table.column("rejected_ids").to_pylist()]
    row = lens.index(max(lens))
    assert 0.01 / lens[row] < 1e-3  # 0.01 nats is under 0.05 per sum, and under 1e-3 per token on this row
    tamper(ok, "ref_rejected", row, 0.01)
    r = verify_cache(str(ok), str(tiny_model), 16)
    assert r["passed"] and abs(r["per_sum"]["max"] - 0.01) < 1e-3


def test_a_different_model_fails(caches, tiny_model, tiny_tokenizer, tmp_path):
    from prefpipe.tiny import build_model
    other = tmp_path / "other"
    build_model(other, tiny_tokenizer, seed=1)  # same shapes and tokenizer, other weights
    with pytest.raises(VerifyFailed) as e:
        verify_cache(str(caches["f32"]), str(other), 4)
    r = e.value.report
    assert not r["model_matches"] and r["tokenizer_matches"]
    assert r["failing"] == r["sequences"] == 8
    assert r["per_token"]["max"] > 0.1  # other random weights: nats, not round-off
    assert "weights differ" in str(e.value)


def test_a_different_tokenizer_fails_even_when_the_numbers_agree(caches, tiny_model, tmp_path):
    from prefpipe.tiny import build_tokenizer
    other = tmp_path / "retokenized"
    shutil.copytree(tiny_model, other)
    build_tokenizer(other, corpus=["a completely different corpus of words for a different vocabulary"] * 3)
    with pytest.raises(VerifyFailed) as e:
        verify_cache(str(caches["f32"]), str(other), 4)
    r = e.value.report
    assert r["model_matches"] and not r["tokenizer_matches"] and r["failing"] == 0
    assert "vocab" in r["tokenizer_differs_in"] and "tokenizer differs" in str(e.value)


def test_bf16_cache_passes_its_own_tolerance_and_shows_bf16_drift(caches, tiny_model):
    r = verify_cache(str(caches["bf16"]), str(tiny_model), 16)
    assert r["passed"] and r["cache"]["dtype"] == "bfloat16"
    assert r["tolerance"] == {"per_token": TOLERANCES["bfloat16"].per_token, "per_sum": TOLERANCES["bfloat16"].per_sum}
    # bf16 has 8 significant bits; its drift is far above float32 round-off (1e-6 per token on this model).
    assert r["per_token"]["max"] > 1e-4


def test_kto_cache_checks_completion_and_partner(caches, tiny_model, tmp_path):
    r = verify_cache(str(caches["kto"]), str(tiny_model), 12)
    assert r["passed"] and r["sequences"] == 24
    bad = tmp_path / "kto-bad"
    shutil.copytree(caches["kto"], bad)
    row_id, _ = tamper(bad, "ref_kl", 2, -1.0)
    with pytest.raises(VerifyFailed) as e:
        verify_cache(str(bad), str(tiny_model), 12)
    assert e.value.report["worst"]["row_id"] == row_id and e.value.report["worst"]["response"] == "kl"
    assert abs(e.value.report["per_sum"]["max"] - 1.0) < 1e-3


def test_sampling_is_seeded_and_bounded(caches, tiny_model):
    a = verify_cache(str(caches["f32"]), str(tiny_model), 3, seed=7)
    b = verify_cache(str(caches["f32"]), str(tiny_model), 3, seed=7)
    assert a["rows"] == 3 and a["worst"] == b["worst"]
    with pytest.raises(UserError, match="positive"):
        verify_cache(str(caches["f32"]), str(tiny_model), 0)


def test_no_reference_cache_is_refused(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", make_pairs(4))
    run_precompute(build(PrecomputeConfig, dict(model=str(tiny_model), data=str(data), out=str(tmp_path / "orpo"),
                                    no_reference=True, **SETTINGS)))
    with pytest.raises(UserError, match="no reference"):
        verify_cache(str(tmp_path / "orpo"), str(tiny_model), 2)


def test_cli_verify_passes_then_fails_after_tampering(caches, tiny_model, tmp_path, run_cli):
    out = tmp_path / "cli"
    args = ["precompute", "--model", tiny_model, "--data", caches["pairs"], "--out", out, "--max_length", "96",
            "--max_prompt_length", "32", "--part_rows", "8", "--device", "cpu", "--dtype", "float32",
            "--no_progress", "--verify", "5"]
    res = run_cli(*args)
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stdout.splitlines() if x.startswith("verify:"))
    assert '"passed": true' in line and '"rows": 5' in line
    tamper(out, "ref_rejected", 0, 3.0)
    res = run_cli(*args[:-1], "16")  # the rerun reuses every part, then verifies all 16 rows
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefpipe: error: ") and "verify failed" in err[0]
    assert "Traceback" not in res.output
