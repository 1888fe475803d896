"""Every row is checked before any model is loaded, and every bad row is named at once.

A bad row deep in a big file used to surface only when scoring reached it, after minutes of work that the fix
(which changes the data fingerprint) then threw away; and only the first bad row was named. Now `data check`,
`precompute`, `train --data` and `pipeline` run one streaming pass over every row first (`Dataset.validate`) and
stop with one error listing the bad rows by file, row and column.
"""

import json
import re

import pytest
from helpers import make_pairs, one_line_error, write_jsonl

from prefpipe.data.formats import Dataset
from prefpipe.data.sources import MAX_BAD_ROWS
from prefpipe.errors import UserError

# The three bad rows of `bad_file`, as the error must name them (JSONL rows are line numbers).
EXPECTED = ("3 bad rows", "row 5: not valid JSON", "row 12, column 'chosen': expected text, got int 3",
            "row 23, column 'rejected': missing value")


def _bad_lines(rows: list[dict], bad: dict[int, str]) -> str:
    """JSONL text of `rows` with line i (1-based) replaced by `bad[i]`."""
    lines = [json.dumps(r) for r in rows]
    for i, text in bad.items():
        lines[i - 1] = text
    return "\n".join(lines) + "\n"


@pytest.fixture
def bad_file(tmp_path):
    rows = make_pairs(30, seed=4)
    chosen_int = json.dumps({**rows[11], "chosen": 3})
    no_rejected = json.dumps({**rows[22], "rejected": None})
    f = tmp_path / "pairs.jsonl"
    f.write_text(_bad_lines(rows, {5: '{"prompt": "cut off', 12: chosen_int, 23: no_rejected}))
    return f


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading any model weights fails the test: the check must come first."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the data was checked")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def _command(name, tiny_model, data, tmp_path):
    if name == "data check":
        return ("data", "check", data, "--model", tiny_model)
    if name == "precompute":
        return ("precompute", "--model", tiny_model, "--data", data, "--out", tmp_path / "cache", "--part_rows", "4")
    if name == "train":
        return ("train", "--model", tiny_model, "--data", data, "--loss_type", "orpo", "--out", tmp_path / "runs",
                "--max_steps", "1")
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tiny_model}"\ndata = "{data}"\nruns_dir = "runs"\nloss_type = ["dpo"]\n'
                    "beta = [0.1]\n[train]\nmax_steps = 1\n")
    return ("pipeline", "--config", toml)


@pytest.mark.parametrize("command", ["data check", "precompute", "train", "pipeline"])
def test_every_bad_row_is_named_before_any_model_loads(command, run_cli, tiny_model, bad_file, tmp_path,
                                                       no_model_load):
    r = run_cli(*_command(command, tiny_model, bad_file, tmp_path))
    err = one_line_error(r, f"file {bad_file}: ", *EXPECTED)
    assert err.index("row 5:") < err.index("row 12,") < err.index("row 23,")  # in file order
    assert not list(tmp_path.rglob("part-*.parquet"))  # nothing scored, nothing written


def test_a_long_list_is_cut_with_a_count_of_the_rest(tmp_path):
    rows = make_pairs(40, seed=5)
    n_bad = MAX_BAD_ROWS + 5
    f = tmp_path / "d.jsonl"
    f.write_text(_bad_lines(rows, {i: "[1, 2]" for i in range(2, 2 + n_bad)}))  # arrays, not objects
    with pytest.raises(UserError) as e:
        Dataset(str(f)).validate()
    msg = e.value.message
    assert msg.startswith(f"{n_bad} bad rows") and f"the first {MAX_BAD_ROWS} shown" in msg
    assert msg.endswith("; and 5 more")
    named = [int(x) for x in re.findall(r"row (\d+): expected a JSON object, got list", msg)]
    assert named == list(range(2, 2 + MAX_BAD_ROWS))


def test_bad_rows_in_several_files_name_their_files_and_an_unreadable_file_is_one_entry(tmp_path):
    d = tmp_path / "data"
    rows = make_pairs(6, seed=6)
    write_jsonl(d / "a.jsonl", rows[:3])
    (d / "a.jsonl").write_text(_bad_lines(rows[:3], {2: json.dumps({**rows[1], "prompt": ["not", "text"]})}))
    (d / "b.parquet").write_bytes(b"not parquet at all")
    (d / "c.json").write_text(json.dumps([rows[3], "a string", rows[4], 7]))
    with pytest.raises(UserError) as e:
        Dataset(str(d)).validate()
    err = e.value
    assert err.file == str(d) and err.message.startswith("4 bad rows or files")
    entries = err.message.split(": ", 1)[1].split("; ")
    assert entries[0].startswith(f"file {d / 'a.jsonl'}, row 2, column 'prompt': ")
    assert entries[1].startswith(f"file {d / 'b.parquet'}: not a readable Parquet file")
    assert entries[2] == f"file {d / 'c.json'}, row 2: expected a JSON object, got str"
    assert entries[3] == f"file {d / 'c.json'}, row 4: expected a JSON object, got int"


def test_a_broken_first_row_does_not_hide_the_others(tmp_path):
    """The format is detected from the first readable row; the broken first row is reported with the rest."""
    rows = make_pairs(5, seed=7)
    f = tmp_path / "d.jsonl"
    f.write_text(_bad_lines(rows, {1: "{oops", 4: json.dumps({**rows[3], "chosen": None})}))
    ds = Dataset(str(f))
    assert ds.format == "paired"
    with pytest.raises(UserError) as e:
        ds.validate()
    assert e.value.file == str(f)
    assert e.value.message.startswith("2 bad rows")
    assert "row 1: not valid JSON" in e.value.message
    assert "row 4, column 'chosen': missing value" in e.value.message


def test_one_bad_row_keeps_its_own_error(tmp_path):
    rows = make_pairs(5, seed=8)
    f = tmp_path / "d.jsonl"
    f.write_text(_bad_lines(rows, {3: json.dumps({**rows[2], "rejected": 1.5})}))
    with pytest.raises(UserError) as e:
        Dataset(str(f)).validate()
    assert (e.value.file, e.value.row, e.value.column) == (str(f), 3, "rejected")
    assert e.value.message == "expected text, got float 1.5"


def test_a_clean_file_is_counted_per_source(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", make_pairs(3))
    write_jsonl(tmp_path / "d" / "b.jsonl", make_pairs(4))
    assert Dataset(str(tmp_path / "d")).validate().row_counts == [3, 4]


def _validate_peak(f):
    import tracemalloc

    ds = Dataset(str(f))
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as e:
            ds.validate()
        return tracemalloc.get_traced_memory()[1], e.value.message
    finally:
        tracemalloc.stop()


def test_the_pass_streams_and_keeps_only_the_listed_errors(tmp_path):
    """Memory does not grow with the rows or with the bad rows: the pass over 16,000 rows, every other one bad, peaks
    no higher than over 4,000 (give or take a batch's worth of noise)."""
    rows = make_pairs(16_000, seed=9)
    lines = [(json.dumps(r) if i % 2 else "{broken") + "\n" for i, r in enumerate(rows)]
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text("".join(lines[:4_000]))
    big.write_text("".join(lines))
    peak_small, _ = _validate_peak(small)
    peak_big, message = _validate_peak(big)
    assert message.startswith("8000 bad rows") and message.endswith("; and 7980 more")
    assert peak_big < 1.3 * peak_small, (peak_small, peak_big)


def test_files_are_named_per_entry_when_a_later_file_is_bad_beyond_the_list(tmp_path):
    """The 21st bad row lies in another file: the list (all in a.jsonl) must still name files, not claim one."""
    d = tmp_path / "data"
    d.mkdir()
    rows = make_pairs(MAX_BAD_ROWS + 1, seed=10)
    (d / "a.jsonl").write_text("{x\n" * MAX_BAD_ROWS + json.dumps(rows[0]) + "\n")
    (d / "b.jsonl").write_text(json.dumps(rows[1]) + "\n{x\n")
    with pytest.raises(UserError) as e:
        Dataset(str(d)).validate()
    assert e.value.file == str(d) and e.value.message.endswith("; and 1 more")
    assert e.value.message.count(f"file {d / 'a.jsonl'}, row ") == MAX_BAD_ROWS


def test_a_passed_validation_is_not_read_again_until_the_file_changes(tmp_path, monkeypatch):
    """The pipeline checks every row up front and its precompute checks again: the second pass of unchanged files
    reads nothing, and a changed file is read (and its new bad row found)."""
    from prefpipe.data import formats

    path = write_jsonl(tmp_path / "d.jsonl", make_pairs(5))
    assert formats.Dataset(str(path)).validate().row_counts == [5]
    real = formats.iter_raw

    def no_reading(*a, **k):
        raise AssertionError("read again")
    ds = formats.Dataset(str(path))  # detecting the format reads the first row
    monkeypatch.setattr(formats, "iter_raw", no_reading)
    assert ds.validate().row_counts == [5]
    monkeypatch.setattr(formats, "iter_raw", real)
    with open(path, "a") as f:
        f.write('{"prompt": "p", "chosen": 3, "rejected": "r"}\n')
    with pytest.raises(UserError, match="row 6"):
        formats.Dataset(str(path)).validate()
