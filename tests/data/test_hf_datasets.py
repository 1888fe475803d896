"""Hugging Face datasets as --data: save_to_disk directories, repository folders and cached hub ids.

Every shape users meet on the hub is written here as a few rows, in each of the three forms, and read back into
records compared with hand-written expectations. Nothing touches the network: the hub id is served from a hub
cache laid out by hand in a temporary directory (refs/main -> snapshots/<commit>/...).
"""

import hashlib
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_disk, make_hub, make_repo, write_jsonl

from prefpipe.data.formats import Columns, Dataset, data_fingerprint
from prefpipe.errors import UserError

pytest.importorskip("datasets")


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


# shape -> (train rows, column mapping, detected format, expected train records). The test split is the train
# split's first row alone, so the two splits' ids for it can differ only through the split.
# Expected records are (prompt, chosen, rejected) or, for KTO, (prompt, completion, label).
UF_TRAIN = [
    {"prompt": "What is 2+2?", "prompt_id": "p0", "chosen": [u("What is 2+2?"), a("4")],
     "rejected": [u("What is 2+2?"), a("5")], "score_chosen": 9.0, "score_rejected": 2.0},
    {"prompt": "Capital of France?", "prompt_id": "p1", "chosen": [s("Be terse."), u("Capital of France?"), a("Paris")],
     "rejected": [s("Be terse."), u("Capital of France?"), a("Lyon, I think")], "score_chosen": 8.5,
     "score_rejected": 1.0},
]
HH_TRAIN = [
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello there", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 5\n\nHuman: sure?\n\nAssistant: It is 4.",
     "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5\n\nHuman: sure?\n\nAssistant: Yes."},
]
ORCA_TRAIN = [
    {"system": "You are an AI assistant.", "question": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"system": "", "question": "Say hi.", "chosen": "Hi!", "rejected": "No."},
]
KTO_TRAIN = [
    {"prompt": [u("hi")], "completion": [a("hello")], "label": True},
    {"prompt": [s("Be kind."), u("2+2?")], "completion": [a("5")], "label": False},
]
SHAPES = {
    "ultrafeedback": (UF_TRAIN, Columns(), "implicit", [
        ([u("What is 2+2?")], [a("4")], [a("5")]),
        ([s("Be terse."), u("Capital of France?")], [a("Paris")], [a("Lyon, I think")])]),
    "ultrafeedback_trl": ([{k: v for k, v in r.items() if k != "prompt"} for r in UF_TRAIN], Columns(), "implicit", [
        ([u("What is 2+2?")], [a("4")], [a("5")]),
        ([s("Be terse."), u("Capital of France?")], [a("Paris")], [a("Lyon, I think")])]),
    "hh": (HH_TRAIN, Columns(), "implicit", [
        ("\n\nHuman: hi\n\nAssistant:", " hello there", " go away"),
        ("\n\nHuman: 2+2?\n\nAssistant: 5\n\nHuman: sure?\n\nAssistant:", " It is 4.", " Yes.")]),
    "orca": (ORCA_TRAIN, Columns(prompt="question", system="system"), "paired", [
        ([s("You are an AI assistant."), u("Name a colour.")], [a("Blue.")], [a("Seven.")]),
        ([u("Say hi.")], [a("Hi!")], [a("No.")])]),
    "kto": (KTO_TRAIN, Columns(), "unpaired", [
        ([u("hi")], [a("hello")], True),
        ([s("Be kind."), u("2+2?")], [a("5")], False)]),
}

def split_rows(shape):
    train = SHAPES[shape][0]
    return train, [train[0]]  # test split: the same first row, alone


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """A private, offline Hugging Face home: nothing read from or written to the user's caches."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return tmp_path / "hf_home"


FORMS = {"disk": make_disk, "repo": make_repo, "hub": make_hub}


def triples(ds):
    out = []
    for batch in ds.batches():
        for r in batch:
            out.append((r.prompt, r.completion, r.label) if r.label is not None else (r.prompt, r.chosen, r.rejected))
    return out


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_shape_in_each_form(tmp_path, shape, form):
    train, test = split_rows(shape)
    _, columns, fmt, expected = SHAPES[shape]
    data = FORMS[form](tmp_path, train, test)
    ds = Dataset(data, columns, batch_rows=1)
    assert ds.format == fmt and ds.hf_kind == form
    assert [len(b) for b in ds.batches()] == [1, 1]  # read in batches of batch_rows
    assert triples(ds) == expected
    assert [r.source for b in ds.batches() for r in b] == [f"{data}:train"] * 2

    again = Dataset(data, columns)
    ids = [r.row_id for b in ds.batches() for r in b]
    assert [r.row_id for b in again.batches() for r in b] == ids and len(set(ids)) == 2
    held_out = Dataset(data, columns, split="test")
    assert triples(held_out) == expected[:1]
    (test_id,) = [r.row_id for b in held_out.batches() for r in b]
    assert test_id != ids[0]  # same row, same row number, other split

    fp = data_fingerprint(data, columns)
    assert ds.fingerprint() == fp == again.fingerprint()
    assert held_out.fingerprint() != fp
    assert data_fingerprint(data, Columns(prompt="other", system=columns.system)) != fp


@pytest.mark.parametrize("form", ["disk", "repo"])
def test_ids_and_fingerprint_do_not_depend_on_where_the_data_lies(tmp_path, form):
    train, test = split_rows("hh")
    data = FORMS[form](tmp_path, train, test)
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(data, moved)
    ids = [[r.row_id for b in Dataset(d).batches() for r in b] for d in (data, str(moved))]
    assert ids[0] == ids[1]
    assert data_fingerprint(data) == data_fingerprint(str(moved))


def test_repo_fingerprint_follows_the_bytes(tmp_path):
    train, test = split_rows("hh")
    data = make_repo(tmp_path, train, test)
    before = data_fingerprint(data)
    changed = [dict(train[0]), train[1]]
    changed[0]["chosen"] += "!"
    pq.write_table(pa.Table.from_pylist(changed), tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    assert data_fingerprint(data) != before


def test_plain_file_fingerprint_is_unchanged(tmp_path):
    """Caches made before these changes must stay valid: the file fingerprint is recomputed here by hand."""
    f = write_jsonl(tmp_path / "d.jsonl", ORCA_TRAIN)
    h = hashlib.sha256()
    h.update(json.dumps({"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "completion": "completion",
                         "label": "label"}, sort_keys=True).encode())
    h.update(b"d.jsonl\0" + f.read_bytes() + b"\0")
    assert data_fingerprint(str(f)) == h.hexdigest()


def test_plain_directory_with_one_split_stays_plain(tmp_path):
    write_jsonl(tmp_path / "d" / "data" / "train.jsonl", HH_TRAIN)
    ds = Dataset(str(tmp_path / "d"))
    assert ds.hf_kind is None and [s.name for s in ds.sources] == ["data/train.jsonl"]


def test_unknown_split_and_config_list_the_available_ones(tmp_path):
    train, test = split_rows("hh")
    disk = make_disk(tmp_path, train, test)
    with pytest.raises(UserError, match=r"unknown split 'validation'; available: train, test"):
        Dataset(disk, split="validation")
    with pytest.raises(UserError, match="has no configs"):
        Dataset(disk, config="x")
    repo = make_repo(tmp_path, train, test)
    with pytest.raises(UserError, match=r"unknown split 'dev'; available: train, test"):
        Dataset(repo, split="dev")
    with pytest.raises(UserError, match=r"unknown config 'x'; available: default"):
        Dataset(repo, config="x")
    with pytest.raises(UserError, match=r"not to data files"):
        Dataset(str(write_jsonl(tmp_path / "f.jsonl", train)), split="test")


def test_configs_in_a_card_choose_the_part(tmp_path):
    d = tmp_path / "multi"
    write_jsonl(d / "hh" / "train.jsonl", HH_TRAIN)
    write_jsonl(d / "kto" / "train.jsonl", KTO_TRAIN)
    (d / "README.md").write_text("---\nconfigs:\n- config_name: hh\n  data_files: hh/*.jsonl\n"
                                 "- config_name: kto\n  data_files: kto/*.jsonl\n---\n")
    kto = Dataset(str(d), config="kto")
    assert kto.format == "unpaired" and triples(kto) == SHAPES["kto"][3]
    assert kto.sources[0].name == f"{d}:kto:train"
    hh = Dataset(str(d), config="hh")
    assert triples(hh) == SHAPES["hh"][3]
    assert data_fingerprint(str(d), config="hh") != data_fingerprint(str(d), config="kto")
    with pytest.raises(UserError, match="hh, kto"):
        Dataset(str(d))  # two configs and none chosen
    with pytest.raises(UserError, match=r"unknown config 'x'; available: hh, kto"):
        Dataset(str(d), config="x")


def test_uncached_hub_id_says_how_to_fetch_it(tmp_path):
    with pytest.raises(UserError, match=r"not-cached/prefs.*not in the local cache.*"
                                        r"hf download --repo-type dataset not-cached/prefs") as e:
        Dataset("not-cached/prefs")
    assert "\n" not in str(e.value)
    # A missing local file that looks like a path is still "no such file".
    with pytest.raises(UserError, match="no such file or directory"):
        Dataset("nowhere/data.jsonl")


def test_system_column_rules(tmp_path):
    rows = [{"system": 3, "question": "q", "chosen": "a", "rejected": "b"}]
    with pytest.raises(UserError, match="expected text") as e:
        triples(Dataset(str(write_jsonl(tmp_path / "s.jsonl", rows)), Columns(prompt="question", system="system")))
    assert (e.value.row, e.value.column) == (1, "system")
    with pytest.raises(UserError, match="no system column 'sys'"):
        Dataset(str(write_jsonl(tmp_path / "o.jsonl", ORCA_TRAIN)), Columns(prompt="question", system="sys"))
    with pytest.raises(UserError, match="not to implicit data"):
        triples(Dataset(str(write_jsonl(tmp_path / "h.jsonl", [{**HH_TRAIN[0], "system": "x"}])),
                        Columns(system="system")))
    # Unset (the default), a system column is ignored as before.
    plain = Dataset(str(write_jsonl(tmp_path / "p.jsonl", ORCA_TRAIN)), Columns(prompt="question"))
    assert triples(plain) == [("Name a colour.", "Blue.", "Seven."), ("Say hi.", "Hi!", "No.")]


def test_bad_rows_and_bad_files_are_one_line_errors(tmp_path):
    train = [HH_TRAIN[0], {"chosen": HH_TRAIN[1]["chosen"], "rejected": None}]
    data = make_repo(tmp_path, train, train[:1])
    with pytest.raises(UserError, match="missing value") as e:
        triples(Dataset(data))
    assert (e.value.file, e.value.row, e.value.column) == (f"{data}:train", 2, "rejected")
    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    for split in ("train", "test"):
        (broken / "data" / f"{split}-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot build the dataset from its files") as e:
        Dataset(str(broken))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("shape", ["ultrafeedback", "kto"])
def test_data_check_reads_a_saved_dataset(run_cli, tiny_model, tmp_path, shape):
    """End to end through `prefpipe data check`: message lists from Arrow render with the chat template."""
    train, test = split_rows(shape)
    res = run_cli("data", "check", make_disk(tmp_path, train, test), "--model", tiny_model)
    assert res.exit_code == 0, res.output
    assert f"format:     {SHAPES[shape][2]}" in res.output and "rows:       2 read, 2 kept, 0 skipped" in res.output


def test_split_config_and_system_column_from_the_command_line(run_cli, tiny_model, tmp_path):
    """--data_split, --data_config and --system_col reach the reader: the test split has a different row count."""
    train, test = split_rows("orca")
    data = make_disk(tmp_path, train, test[:1])
    common = ("--model", tiny_model, "--prompt_col", "question", "--system_col", "system")
    res = run_cli("data", "check", data, *common)
    assert res.exit_code == 0, res.output
    assert f"rows:       {len(train)} read" in res.output
    res = run_cli("data", "check", data, *common, "--data_split", "test")
    assert res.exit_code == 0, res.output
    assert "rows:       1 read" in res.output
    res = run_cli("data", "check", data, *common, "--data_split", "nope")
    assert res.exit_code == 2 and "nope" in res.output
    res = run_cli("data", "check", data, *common, "--data_config", "x")
    assert res.exit_code == 2
