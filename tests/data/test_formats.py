"""Preference data loading: the four shapes, the file kinds, and stable row ids."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_pairs, make_unpaired, write_jsonl

from prefpipe.data.formats import Columns, Dataset, split_implicit
from prefpipe.errors import UserError


def records(ds):
    return [r for b in ds.batches() for r in b]


def test_paired_plain(tmp_path):
    ds = Dataset(str(write_jsonl(tmp_path / "p.jsonl", make_pairs(5))))
    assert ds.format == "paired" and ds.paired
    rs = records(ds)
    assert [r.row for r in rs] == [1, 2, 3, 4, 5]
    assert rs[0].prompt.startswith("Q0: ") and rs[4].rejected.endswith(" no")


def test_conversational(tmp_path):
    row = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}
    ds = Dataset(str(write_jsonl(tmp_path / "c.jsonl", [row])))
    assert ds.format == "conversational"
    r = records(ds)[0]
    assert r.prompt == row["prompt"] and r.chosen == row["chosen"] and r.rejected == row["rejected"]


def test_implicit_hh_strings(tmp_path):
    shared = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: what is 2+2?\n\nAssistant:"
    row = {"chosen": shared + " It is 4.", "rejected": shared + " It is 5."}
    ds = Dataset(str(write_jsonl(tmp_path / "hh.jsonl", [row])))
    assert ds.format == "implicit"
    r = records(ds)[0]
    # The common prefix runs to " It is " but the prompt is cut at the last shared turn marker.
    assert r.prompt == shared and r.chosen == " It is 4." and r.rejected == " It is 5."


def test_implicit_messages():
    u = {"role": "user", "content": "q"}
    c = [u, {"role": "assistant", "content": "good"}]
    r = [u, {"role": "assistant", "content": "bad"}]
    prompt, ch, rj = split_implicit(c, r, "f", 1, Columns())
    assert prompt == [u] and ch == [c[1]] and rj == [r[1]]


def test_implicit_without_marker_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", [{"chosen": "abc yes", "rejected": "abc no"}])
    with pytest.raises(UserError, match="turn marker") as e:
        records(Dataset(str(f)))
    assert e.value.row == 1 and e.value.column == "chosen"


def test_unpaired(tmp_path):
    ds = Dataset(str(write_jsonl(tmp_path / "u.jsonl", make_unpaired(6))))
    assert ds.format == "unpaired" and not ds.paired
    assert [r.label for r in records(ds)] == [False, True, True, False, True, True]


def test_json_parquet_dir_glob_agree(tmp_path):
    rows = make_pairs(7)
    write_jsonl(tmp_path / "a" / "d.jsonl", rows)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "d.json").write_text(json.dumps(rows))
    (tmp_path / "c").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c" / "d.parquet")
    got = {}
    for name, path in (("jsonl", tmp_path / "a" / "d.jsonl"), ("json", tmp_path / "b" / "d.json"),
                       ("parquet", tmp_path / "c" / "d.parquet"), ("dir", tmp_path / "c"),
                       ("glob", str(tmp_path / "a" / "*.jsonl"))):
        got[name] = [(r.prompt, r.chosen, r.rejected) for r in records(Dataset(str(path), batch_rows=3))]
    expected = [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert all(v == expected for v in got.values())


def test_shards_in_order(tmp_path):
    rows = make_pairs(10)
    write_jsonl(tmp_path / "s" / "shard-00.jsonl", rows[:4])
    write_jsonl(tmp_path / "s" / "shard-01.jsonl", rows[4:])
    rs = records(Dataset(str(tmp_path / "s" / "shard-*.jsonl")))
    assert [r.prompt for r in rs] == [r["prompt"] for r in rows]
    assert [r.source for r in rs] == ["shard-00.jsonl"] * 4 + ["shard-01.jsonl"] * 6


def test_column_overrides(tmp_path):
    rows = [{"question": "q", "good": "a", "bad": "b"}]
    f = write_jsonl(tmp_path / "o.jsonl", rows)
    ds = Dataset(str(f), Columns(prompt="question", chosen="good", rejected="bad"))
    r = records(ds)[0]
    assert (ds.format, r.prompt, r.chosen, r.rejected) == ("paired", "q", "a", "b")


def test_row_ids_stable_unique_and_content_bound(tmp_path):
    rows = make_pairs(4) + [make_pairs(4)[0]]  # last row duplicates the first
    f1 = write_jsonl(tmp_path / "one" / "data.jsonl", rows)
    f2 = tmp_path / "two" / "data.jsonl"
    f2.parent.mkdir()
    shutil.copy(f1, f2)
    ids1 = [r.row_id for r in records(Dataset(str(f1)))]
    ids2 = [r.row_id for r in records(Dataset(str(f2), batch_rows=2))]
    assert ids1 == ids2  # same source name and content, another directory, other batching: same ids
    assert len(set(ids1)) == 5  # a duplicate row still gets its own id
    changed = [dict(r) for r in rows]
    changed[2]["chosen"] += "!"
    ids3 = [r.row_id for r in records(Dataset(str(write_jsonl(tmp_path / "three" / "data.jsonl", changed))))]
    assert [a == b for a, b in zip(ids1, ids3)] == [True, True, False, True, True]


def test_data_fingerprint_tracks_bytes(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(3))
    a = Dataset(str(f)).fingerprint()
    assert Dataset(str(f)).fingerprint() == a
    f.write_text(f.read_text().replace("Q1", "Q9"))
    assert Dataset(str(f)).fingerprint() != a
    assert Dataset(str(f), Columns(prompt="prompt", chosen="rejected", rejected="chosen")).fingerprint() != a
