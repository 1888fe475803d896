"""The total of the precompute progress bar: how many input rows this process will go through.

Counting is cheap next to scoring: Parquet files state their row count in the footer, JSONL files take one pass
over their lines (no parsing). A `.json` array would have to be parsed whole, so with one among the sources the
bar has no total (it still counts rows and shows the rate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prefpipe.data.formats import Source


def count_rows(source: Source) -> int | None:
    """Rows in one file as the reader numbers them (JSONL: non-blank lines), or None if not cheap to know."""
    name = source.path.name
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(source.path).metadata.num_rows
        except (pa.ArrowInvalid, OSError):
            return None  # the reader reports the broken file with its own error
    if name.endswith(".json"):
        return None
    with open(source.path, "rb") as f:
        return sum(1 for line in f if line.strip())


def rows_to_process(sources: Sequence[Source], part_rows: int, owns: Callable[[int], bool]) -> int | None:
    """Input rows in the parts `owns` accepts (all of them for a single process).

    Parts are cut per file, `part_rows` at a time, numbered across files in order: the same layout the data reader
    produces, so under torchrun or --shard each process's bar ends at its own share."""
    total, index = 0, 0
    for source in sources:
        n = count_rows(source)
        if n is None:
            return None
        for start in range(0, n, part_rows):
            if owns(index):
                total += min(part_rows, n - start)
            index += 1
    return total
