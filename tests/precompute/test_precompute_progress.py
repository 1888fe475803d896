"""The precompute progress bar's total: the rows each process goes through, known before scoring starts."""

import pyarrow as pa
import pyarrow.parquet as pq

from helpers import make_pairs, write_jsonl
from prefpipe.data.formats import Dataset
from prefpipe.precompute.progress import rows_to_process


def _data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    a = write_jsonl(d / "a.jsonl", make_pairs(7, seed=1))
    # Blank lines are not rows: the reader skips them, so the count must too.
    a.write_text("\n" + a.read_text().replace("\n", "\n\n", 2) + "\n  \n")
    pq.write_table(pa.Table.from_pylist(make_pairs(11, seed=2)), d / "b.parquet")
    return d


def test_counts_rows_per_file_and_the_share_of_each_process(tmp_path):
    d = _data_dir(tmp_path)
    counts = Dataset(str(d)).validate().row_counts
    assert counts == [7, 11]
    # part_rows 4: a.jsonl gives parts 0,1 (4+3 rows), b.parquet parts 2,3,4 (4+4+3 rows).
    assert rows_to_process(counts, 4, lambda i: True) == 18
    assert rows_to_process(counts, 4, lambda i: i % 2 == 0) == 4 + 4 + 3
    assert rows_to_process(counts, 4, lambda i: i % 2 == 1) == 3 + 4
    assert rows_to_process(counts, 4, lambda i: i % 3 == 2) == 4

    # The same layout as the reader's parts.
    parts = [len(b) for b in Dataset(str(d), batch_rows=4).batches()]
    assert parts == [4, 3, 4, 4, 3]


def test_every_form_is_counted_by_the_reader_itself(tmp_path):
    """The counts come from the validation pass's reader: a JSON array and a gzipped file count their rows (not
    their compressed bytes' newlines), as scoring will read them."""
    import gzip
    import json
    rows = make_pairs(5, seed=3)
    (tmp_path / "x.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "y.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n\n" for r in rows).encode()))
    for name in ("x.json", "y.jsonl.gz"):
        assert Dataset(str(tmp_path / name)).validate().row_counts == [5], name


def test_the_precompute_bar_shows_the_total(tmp_path, tiny_model, pairs_file, run_cli):
    res = run_cli("precompute", "--model", tiny_model, "--data", pairs_file, "--out", tmp_path / "cache",
                  "--part_rows", "10", "--dtype", "float32", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "24/24" in res.stderr  # pairs_file holds 24 rows
