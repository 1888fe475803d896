"""`prefpipe.data.mapped`: `take_rows` gives the rows `Table.take` gives, from a chunked table, without
concatenating its chunks; `release_pages` unmaps what a mapped table has read and keeps its values."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from prefpipe.data.mapped import take_rows


def chunked() -> pa.Table:
    # Three chunks of 3, 1 and 4 rows; a list column, a string column and a float column, as a cache has.
    parts = [(0, 3), (3, 4), (4, 8)]
    return pa.concat_tables([pa.table({"ids": [[i] * (i % 3 + 1) for i in range(a, b)],
                                       "row_id": [f"r{i}" for i in range(a, b)],
                                       "ref": [-float(i) for i in range(a, b)]}) for a, b in parts])


@pytest.mark.parametrize("rows", [[7, 0, 3, 0, 5], [2], [3], [6, 5, 4], list(range(8))[::-1], []])
def test_rows_in_the_order_given(rows):
    t = chunked()
    assert t.column("ids").num_chunks == 3
    got = take_rows(t, rows)
    # Expected by hand from how chunked() builds row i: ids [i] * (i % 3 + 1), row_id "r<i>", ref -i.
    assert got.to_pydict() == {"ids": [[i] * (i % 3 + 1) for i in rows], "row_id": [f"r{i}" for i in rows],
                               "ref": [-float(i) for i in rows]}
    assert got.column("ids").num_chunks <= 1 and got.schema == t.schema


def test_indices_as_numpy_or_arrow_and_out_of_range():
    t = chunked()
    assert take_rows(t, np.array([4, 1])).column("row_id").to_pylist() == ["r4", "r1"]
    assert take_rows(t, pa.array([6, 6], type=pa.int64())).column("row_id").to_pylist() == ["r6", "r6"]
    with pytest.raises(IndexError):
        take_rows(t, [8])
    with pytest.raises(IndexError):
        take_rows(t, [-1])


def test_columns_chunked_differently():
    # Columns cut at different rows: to_batches cuts at every boundary, and the rows still come out right.
    t = pa.table({"a": pa.chunked_array([[0, 1], [2, 3, 4]]), "b": pa.chunked_array([["x0"], ["x1", "x2", "x3"],
                                                                                     ["x4"]])})
    assert take_rows(t, [4, 1, 2]).to_pydict() == {"a": [4, 1, 2], "b": ["x4", "x1", "x2"]}


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_release_pages_drops_mapped_pages_and_keeps_values(tmp_path):
    import gc
    import weakref

    from prefpipe.data import mapped

    n = 8 << 20  # 8M float64: a 64 MiB mapping
    path = tmp_path / "t.arrow"
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, pa.schema([("x", pa.float64())])) as w:
        w.write_table(pa.table({"x": np.arange(n, dtype=np.float64)}))
    earlier = set(mapped._MAPS)
    t = mapped.map_ipc_file(str(path))
    path.unlink()  # the mapping keeps the data, as read_cache relies on
    mine = [weakref.ref(m) for m in set(mapped._MAPS) - earlier]
    assert len(mine) == 1
    before = _rss_file_kib()
    assert pc.sum(t.column("x")).as_py() == n * (n - 1) / 2  # reads every page
    touched = _rss_file_kib()
    assert touched - before > 48 * 1024
    mapped.release_pages()
    assert touched - _rss_file_kib() > 48 * 1024
    assert pc.sum(t.column("x")).as_py() == n * (n - 1) / 2  # the values are still there
    del t
    gc.collect()
    assert mine[0]() is None  # the mapping goes with its last table (other tests' mappings may go too)
