"""State that must not grow with the rows: the duplicate count's hashes, `data check`'s lengths, labels and skip
records, precompute's per-part bookkeeping. Counts are checked against hand-counted data."""

from __future__ import annotations

import json

from helpers import write_jsonl

from prefpipe.data.cache import read_cache
from prefpipe.data.cli import _quantiles
from prefpipe.data.tokenize import SeenHashes


def test_seen_hashes_count_repeats_within_and_across_blocks():
    a, b, c, d = "0000000000000001", "ffffffffffffffff", "8000000000000000", "00000000000000ff"
    seen = SeenHashes()
    assert seen.add([a, b, a]) == 1  # the second a
    assert seen.add([]) == 0
    assert seen.add([c, b, c, d, a]) == 3  # b and a from before, the second c
    assert seen.add([d]) == 1
    assert len(seen) == 4  # one entry per distinct hash, 8 bytes each
    assert seen._sorted.nbytes == 32


def test_seen_hashes_take_hand_built_hashes():
    # Records built by hand have "" (or any string) as content hash: equal strings still count as repeats.
    seen = SeenHashes()
    assert seen.add(["", "x", "", "not-hex-16-chars", "not-hex-16-chars", "x"]) == 3


def test_quantiles_from_a_histogram_are_nearest_rank():
    # Sorted values 3 3 5 9 9 9 20 (n = 7): median rank round(0.5 * 6) = 3 -> 9; p95 rank round(0.95 * 6) = 6 -> 20.
    assert _quantiles({9: 3, 3: 2, 20: 1, 5: 1}).split() == ["3", "9", "20", "20"]
    # n = 4: median rank round(1.5) = 2 (banker's rounding, as the list version had) -> 5; p95 rank round(2.85) = 3.
    assert _quantiles({3: 2, 5: 1, 7: 1}).split() == ["3", "5", "7", "7"]
    assert _quantiles({}) == "-"


def test_data_check_lengths_labels_and_first_skips(run_cli, tiny_model, tiny_tokenizer, tmp_path):
    rows = [{"prompt": "the " * k, "completion": "fox", "label": k % 3 == 0} for k in (1, 2, 2, 5, 3)]
    rows += [{"prompt": "q ", "completion": "", "label": True}, {"prompt": "r ", "completion": "", "label": False}]
    r = run_cli("data", "check", write_jsonl(tmp_path / "k.jsonl", rows), "--model", tiny_model)
    assert r.exit_code == 0, r.output
    bos = len(tiny_tokenizer("x")["input_ids"]) - len(tiny_tokenizer("x", add_special_tokens=False)["input_ids"])
    lens = sorted(len(tiny_tokenizer("the " * k, add_special_tokens=False)["input_ids"]) + bos
                  for k in (1, 2, 2, 5, 3))
    # Five kept prompts: nearest-rank median is the 3rd value, p95 rank round(3.8) = 4, the largest.
    assert f"  prompt     {lens[0]:>6} {lens[2]:>7} {lens[4]:>6} {lens[4]:>6}\n" in r.output
    assert "labels:     1 desirable, 4 undesirable" in r.output  # kept rows only: k = 3 is the desirable one
    assert "       2  empty_response:" in r.output and "(first: k.jsonl row 6)" in r.output


def test_precompute_counts_duplicates_across_parts_and_on_resume(run_cli, tiny_model, tmp_path):
    base = [{"prompt": f"q{i} ", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(4)]
    A, B, C, D = base
    same = {"prompt": "s ", "chosen": "x", "rejected": "x"}  # skipped: chosen equals rejected
    # Parts of 3: [A B C] [A D B] [D same D]. Repeats: A (row 4), B (6), D (8), D (9); the skipped row is unique.
    data = write_jsonl(tmp_path / "d.jsonl", [A, B, C, A, D, B, D, same, D])
    out = tmp_path / "cache"
    cmd = ["precompute", "--model", tiny_model, "--data", data, "--out", out, "--part_rows", "3", "--no_progress",
           "--no_reference"]
    r = run_cli(*cmd)
    assert r.exit_code == 0, r.output
    counts = read_cache(out).metadata["counts"]
    assert counts["duplicates"] == 4 and counts["rows_read"] == 9 and counts["rows_written"] == 8
    assert "duplicates kept: 4" in r.output
    assert "chosen_equals_rejected" in r.output and "(first: d.jsonl row 8)" in r.output
    # Resume with the middle part missing: the reused parts' hashes still count, and the total is the same.
    (out / "manifest.json").unlink()
    (out / "part-00001.parquet").unlink()
    r = run_cli(*cmd)
    assert r.exit_code == 0, r.output
    assert "1 written now, 2 reused" in r.output and "(first: d.jsonl row 8)" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metadata"]["counts"]["duplicates"] == 4
