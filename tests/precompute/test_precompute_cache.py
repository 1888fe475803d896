"""`prefpipe precompute` and `prefpipe inspect` end to end on the tiny model: columns, metadata, skips, damage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from helpers import make_pairs, write_jsonl
from prefpipe.data.cache import MANIFEST, read_cache, write_part
from prefpipe.data.fingerprint import model_fingerprint, tokenizer_fingerprint
from prefpipe.data.formats import Dataset
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.modeling import load_model
from test_precompute_backend import naive_float64
from prefpipe import rundir


def rows_with_skips():
    rows = make_pairs(14, seed=5)
    rows.insert(3, {"prompt": "Q: empty", "chosen": "", "rejected": "the cat"})  # empty_response
    rows.insert(9, {"prompt": "Q: same", "chosen": "a dog", "rejected": "a dog"})  # chosen_equals_rejected
    rows.append(dict(rows[0]))  # a duplicate, kept and counted
    return rows  # 17 rows: 15 written, 2 skipped


@pytest.fixture(scope="module")
def paired_cache(tiny_model, tmp_path_factory):
    from click.testing import CliRunner

    from prefpipe.cli import cli
    d = tmp_path_factory.mktemp("paired")
    data = write_jsonl(d / "pairs.jsonl", rows_with_skips())
    out = d / "cache"
    res = CliRunner().invoke(cli, ["precompute", "--model", str(tiny_model), "--data", str(data), "--out", str(out),
                                   "--part_rows", "6", "--max_length", "96", "--max_prompt_length", "24",
                                   "--batch_tokens", "300", "--no_progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return data, out, res.output


def test_columns_in_input_order_and_scores_match_float64(paired_cache, tiny_model):
    data, out, _ = paired_cache
    cache = read_cache(out)
    t = cache.table.to_pydict()
    ds = Dataset(str(data))
    expected_ids = [r.row_id for b in ds.batches() for r in b if r.chosen and r.chosen != r.rejected]
    assert t["row_id"] == expected_ids  # input order survives length sorting; skipped rows absent
    assert all(len(p) <= 24 and len(p) + len(c) <= 96 and len(p) + len(r) <= 96
               for p, c, r in zip(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]))
    assert t["chosen_len"] == [len(c) for c in t["chosen_ids"]]
    model64 = load_model(str(tiny_model), dtype=torch.float64).eval()
    rows = [0, 4, 7, 14]  # a few rows from different parts; the backend tests cover the rest
    P = [t["prompt_ids"][i] for i in rows]
    want = naive_float64(model64, P + P, [t["chosen_ids"][i] for i in rows] + [t["rejected_ids"][i] for i in rows])
    got = [t["ref_chosen"][i] for i in rows] + [t["ref_rejected"][i] for i in rows]
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-6 * abs(w) + 1e-5


def test_metadata_and_counts(paired_cache, tiny_model, tiny_tokenizer):
    data, out, output = paired_cache
    manifest = json.loads((out / MANIFEST).read_text())
    m = manifest["metadata"]
    assert m["schema_version"] == 1 and m["kind"] == "paired" and m["has_reference"] is True
    assert m["model"]["fingerprint"] == model_fingerprint(tiny_model)
    assert m["tokenizer"] == tokenizer_fingerprint(tiny_tokenizer)
    assert m["tokenization"] == TokenizeSettings(96, 24).metadata()
    assert m["data"]["fingerprint"] == Dataset(str(data)).fingerprint() and m["data"]["format"] == "paired"
    assert m["backend"]["name"] == "hf" and m["backend"]["dtype"] == "float32" and m["backend"]["version"]
    assert m["prefpipe_version"]
    assert "beta" not in json.dumps(m)
    c = m["counts"]
    assert c["rows_read"] == 17 and c["rows_written"] == 15 and c["rows_skipped"] == 2
    assert c["skipped"] == {"empty_response": 1, "chosen_equals_rejected": 1}
    assert c["duplicates"] == 1
    t = read_cache(out).table.to_pydict()
    assert c["response_tokens"] == sum(map(len, t["chosen_ids"] + t["rejected_ids"]))
    assert c["tokens_scored"] == c["response_tokens"] + 2 * sum(map(len, t["prompt_ids"]))
    # 17 rows in parts of 6: three parts, each carrying the same metadata plus its own counts.
    assert [p["rows"] for p in manifest["parts"]] == [5, 5, 5]
    for i, p in enumerate(manifest["parts"]):
        pm = json.loads(pq.read_schema(out / p["file"]).metadata[b"prefpipe"])
        assert pm["part"]["index"] == i
        assert {k: v for k, v in pm.items() if k not in ("part", "created_at")} == \
            {k: v for k, v in m.items() if k not in ("counts", "created_at")}
    # The summary a person sees.
    assert "17 read, 15 kept, 15 rows written, 2 skipped" in output
    assert "empty_response" in output and "pairs.jsonl row 4" in output
    assert "chosen_equals_rejected" in output and "tokens/s" in output


def test_inspect_prints_metadata_and_statistics(paired_cache, run_cli):
    _, out, _ = paired_cache
    res = run_cli("inspect", out)
    assert res.exit_code == 0, res.output
    t = read_cache(out).table.to_pydict()
    per_tok = [s / n for s, n in zip(t["ref_chosen"], t["chosen_len"])]
    mean = sum(per_tok) / len(per_tok)
    std = math.sqrt(sum((x - mean) ** 2 for x in per_tok) / (len(per_tok) - 1))
    lines = res.output.splitlines()
    start = lines.index("reference log-prob per response token:")
    chosen = lines[start + 2].split()
    assert chosen[0] == "chosen"
    assert float(chosen[1]) == pytest.approx(mean, rel=1e-3) and float(chosen[2]) == pytest.approx(std, rel=1e-3)
    assert "model.fingerprint" in res.output and "tokenization.max_length" in res.output
    assert "rows: 15" in res.output


def test_damaged_caches_are_refused(paired_cache, tmp_path, run_cli):
    import shutil
    _, out, _ = paired_cache
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    part = cut / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    res = run_cli("inspect", cut)
    assert res.exit_code == 2
    assert "part-00001.parquet" in res.output and "truncated or corrupted" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1

    nan = tmp_path / "nan"
    shutil.copytree(out, nan)
    part = nan / "part-00002.parquet"
    table = pq.read_table(part)
    cols = table.to_pydict()
    cols["ref_rejected"][3] = float("nan")
    write_part(part, cols, "paired", json.loads(table.schema.metadata[b"prefpipe"]))
    res = run_cli("inspect", nan)
    assert res.exit_code == 2
    assert "row 4" in res.output and "ref_rejected" in res.output and "NaN" in res.output

    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / MANIFEST).unlink()
    res = run_cli("inspect", unfinished)
    assert res.exit_code == 2 and "manifest.json is missing" in res.output


def test_a_different_run_is_never_mixed_in(paired_cache, tmp_path, run_cli, tiny_model):
    import shutil
    data, out, _ = paired_cache
    d = tmp_path / "c"
    shutil.copytree(out, d)
    base = ["precompute", "--model", tiny_model, "--data", data, "--out", d, "--part_rows", "6",
            "--max_prompt_length", "24", "--batch_tokens", "300", "--no_progress"]
    res = run_cli(*base, "--max_length", "80")
    assert res.exit_code == 2
    assert "tokenization settings differ (max_length: cache 96, now 80)" in res.output and "--overwrite" in res.output
    res = run_cli(*base, "--max_length", "80", "--overwrite")
    assert res.exit_code == 0, res.output
    assert read_cache(d).metadata["tokenization"]["max_length"] == 80
    assert "3 written now, 0 reused" in res.output


def test_no_reference_writes_an_orpo_cache(tmp_path, run_cli, tiny_model):
    data = write_jsonl(tmp_path / "p.jsonl", make_pairs(7))
    res = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", tmp_path / "o", "--no_reference",
                  "--no_progress")
    assert res.exit_code == 0, res.output
    cache = read_cache(tmp_path / "o")
    assert cache.metadata["has_reference"] is False and cache.metadata["backend"] == {"name": "none"}
    assert not cache.has_reference and "ref_chosen" not in cache.table.column_names
    assert cache.table.num_rows == 7 and cache.metadata["counts"]["tokens_scored"] == 0
    res = run_cli("inspect", tmp_path / "o")
    assert res.exit_code == 0 and "reference log-prob" not in res.output


def test_bad_input_is_one_line(tmp_path, run_cli, tiny_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    res = run_cli("precompute", "--model", tiny_model, "--data", bad, "--out", tmp_path / "x", "--no_progress")
    assert res.exit_code == 2 and "row 2" in res.output and "'chosen'" in res.output
    good = write_jsonl(tmp_path / "g.jsonl", make_pairs(3))
    for extra, needle in ((["--part_rows", "0"], "--part_rows"), (["--shard", "2/2"], "--shard"),
                          (["--no_reference", "--kto"], "KTO"), (["--batch_tokens", "0"], "--batch_tokens")):
        res = run_cli("precompute", "--model", tiny_model, "--data", good, "--out", tmp_path / "y", "--no_progress",
                      *extra)
        assert res.exit_code == 2 and needle in res.output, (extra, res.output)
        assert len(res.output.strip().splitlines()) == 1
    all_skipped = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 2)
    res = run_cli("precompute", "--model", tiny_model, "--data", all_skipped, "--out", tmp_path / "z",
                  "--no_progress")
    assert res.exit_code == 2 and "chosen_equals_rejected: 2" in res.output


def _values_digest(part: Path) -> dict:
    """The manifest's content digests, derived here from their definition: per scalar column, its values in order
    (text + NUL, numbers as little-endian bytes)."""
    import hashlib
    import struct
    t = pq.read_table(part)
    out = {}
    for name, fmt in (("row_id", None), ("ref_chosen", "<d"), ("ref_rejected", "<d"), ("chosen_len", "<i"),
                      ("rejected_len", "<i")):
        h = hashlib.sha256()
        for v in t.column(name).to_pylist():
            h.update(v.encode() + b"\0" if fmt is None else struct.pack(fmt, v))
        out[name] = h.hexdigest()
    return out


def test_manifest_records_each_part_checksum(paired_cache):
    _, out, _ = paired_cache
    parts = json.loads((out / MANIFEST).read_text())["parts"]
    assert [p["file"] for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for p in parts:
        assert p["content_sha256"] == _values_digest(out / p["file"])
    assert len({p["identity"] for p in parts}) == 1 and len(parts[0]["identity"]) == 64


def test_a_part_copied_in_from_another_models_cache_is_refused(paired_cache, tmp_path, tmp_path_factory, run_cli,
                                                               tiny_model):
    """Same tokenizer and data, other weights: the part's rows look plausible (ids equal, sums close), only the
    manifest's checksum tells it apart."""
    import shutil

    from transformers import AutoTokenizer

    from prefpipe.tiny import build_model
    data, out, _ = paired_cache
    other = tmp_path / "reweighted"
    build_model(other, AutoTokenizer.from_pretrained(tiny_model), seed=1)
    theirs = tmp_path / "theirs"
    res = run_cli("precompute", "--model", other, "--data", data, "--out", theirs, "--part_rows", "6",
                  "--max_length", "96", "--max_prompt_length", "24", "--batch_tokens", "300", "--no_progress")
    assert res.exit_code == 0, res.output
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copyfile(theirs / "part-00001.parquet", mixed / "part-00001.parquet")
    assert pq.read_table(mixed / "part-00001.parquet").column("row_id") == pq.read_table(
        out / "part-00001.parquet").column("row_id")
    res = run_cli("inspect", mixed)
    assert res.exit_code == 2 and "part-00001.parquet" in res.output and "changed after the cache" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = run_cli("train", "--model", tiny_model, "--cache", mixed, "--out", tmp_path / "runs", "--max_steps", "1",
                  "--batch_size", "4", "--no_progress", "--device", "cpu")
    assert res.exit_code == 2 and "part-00001.parquet" in res.stderr
    assert not (tmp_path / "runs" / "dpo-beta0.1" / rundir.METRICS).exists()


def test_a_part_that_fails_validation_is_rescored_on_resume(paired_cache, tmp_path, run_cli, tiny_model):
    import shutil
    data, out, _ = paired_cache
    d = tmp_path / "c"
    shutil.copytree(out, d)
    (d / MANIFEST).unlink()
    part = d / "part-00002.parquet"
    table = pq.read_table(part)
    cols = table.to_pydict()
    good = cols["ref_rejected"][3]
    cols["ref_rejected"][3] = float("nan")
    write_part(part, cols, "paired", json.loads(table.schema.metadata[b"prefpipe"]))
    res = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", d, "--part_rows", "6",
                  "--max_length", "96", "--max_prompt_length", "24", "--batch_tokens", "300", "--no_progress")
    assert res.exit_code == 0, res.output
    assert "1 written now, 2 reused" in res.output
    again = pq.read_table(part).column("ref_rejected").to_pylist()[3]
    assert math.isfinite(again) and abs(again - good) <= 1e-5 * max(1.0, abs(good))
    assert read_cache(d).table.num_rows == 15
