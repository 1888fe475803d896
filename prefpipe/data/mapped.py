"""Memory-mapped cache tables whose footprint does not grow with the cache: mapping, page release, row selection.

`read_cache(..., memory_map=True)` maps each part from an Arrow IPC file (`map_ipc_file`). Two things would
otherwise make a process's resident memory follow the cache's size rather than what it is doing:

- **Touched pages stay mapped.** Every page of a mapping that is read stays in the process's RSS until the
  mapping goes. A training run reads a few random rows a step, but each read maps the page around it (and the
  kernel maps neighbouring pages with it), so after some hundred steps most of a million-row cache is resident:
  about 150 MB of the 160 MB at a million short rows. `release_pages` drops those entries (`MADV_DONTNEED`); the
  data stays in the page cache and the next read maps it again, so it is safe at any time.
- **pyarrow's `Table.take` concatenates.** On a table of many chunks (one per part), pyarrow 26 joins every
  column's chunks before it takes, so 8 rows of a million-row cache read the whole cache and copy about 50 MB,
  per call. `take_rows` takes from each chunk on its own and releases the pages afterwards.
"""

from __future__ import annotations

import mmap
import weakref
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_MAPS: weakref.WeakSet = weakref.WeakSet()  # live mappings; one goes when the last table using it does


def map_ipc_file(path: str) -> pa.Table:
    """The Arrow IPC file at `path`, read zero-copy from a read-only shared mapping that `release_pages` knows.
    The mapping outlives the file's name: the caller may unlink it at once."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    _MAPS.add(mm)
    return pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mm))).read_all()


def release_pages() -> None:
    """Unmap this process's resident pages of every table `map_ipc_file` made (a no-op where the platform has no
    madvise). Only file-backed, read-only mappings are touched, never memory the process owns, so the values a
    table holds are unchanged; reading them again costs a minor page fault per page."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    for mm in list(_MAPS):
        try:
            mm.madvise(advice)
        except (ValueError, OSError):  # closed meanwhile
            pass


def chunks(table: pa.Table, names: Sequence[str]):
    """The columns `names` of `table`, one record batch (one cache part) at a time. The mapped pages a batch
    touched are released when the caller asks for the next one, so copy what you keep (views of the mapping
    would map its pages again)."""
    for batch in table.select(list(names)).to_batches():
        yield batch
        release_pages()


def take_rows(table: pa.Table, rows: Sequence[int] | np.ndarray | pa.Array) -> pa.Table:
    """`table.take(rows)`: the rows in the order given (repeats allowed), as one chunk of fresh buffers, reading
    only the chunks that hold them; then `release_pages`. An index outside the table raises IndexError, as
    `Table.take` does."""
    idx = np.asarray(rows.to_numpy(zero_copy_only=False) if isinstance(rows, pa.Array) else rows, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError("rows must be one-dimensional")
    if len(idx) and (idx.min() < 0 or idx.max() >= table.num_rows):
        raise IndexError(f"row index out of range for a table of {table.num_rows} rows")
    batches = table.to_batches()  # zero-copy views, cut where any column's chunks are cut
    if len(batches) <= 1 or not len(idx):
        out = table.take(pa.array(idx, type=pa.int64())).combine_chunks()
    else:
        starts = np.cumsum([0] + [b.num_rows for b in batches])
        which = np.searchsorted(starts, idx, side="right") - 1
        order = np.argsort(which, kind="stable")  # grouped by chunk, each group in the order asked
        grouped, sorted_idx, pieces = which[order], idx[order], []
        for k in np.unique(grouped):
            local = sorted_idx[grouped == k] - starts[k]
            pieces.append(batches[k].take(pa.array(local, type=pa.int64())))
        small = pa.Table.from_batches(pieces, schema=table.schema).combine_chunks()
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        out = small.take(pa.array(back, type=pa.int64()))
    release_pages()
    return out
