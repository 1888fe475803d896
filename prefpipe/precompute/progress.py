"""The precompute parts' layout over the input, and so the progress bar's total: how many input rows this process
will go through.

The rows of each source are counted by `Dataset.validate()`, the pass that reads every row before any model is
loaded, with the reader that scoring uses: so every input form (JSON Lines plain or gzipped, JSON arrays, Parquet,
Hugging Face datasets) has a total, and it is the reader's own count (blank lines are no rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def part_sizes(row_counts: Sequence[int], part_rows: int) -> list[int]:
    """The input rows of each part, in part order, given each source's rows.

    Parts are cut per file, `part_rows` at a time, numbered across files in order: the same layout the data reader
    produces (`Dataset.batches`)."""
    return [min(part_rows, n - start) for n in row_counts for start in range(0, n, part_rows)]


def rows_to_process(row_counts: Sequence[int], part_rows: int, owns: Callable[[int], bool]) -> int:
    """Input rows in the parts `owns` accepts (all of them for a single process), so that under torchrun or --shard
    each process's bar ends at its own share."""
    return sum(n for index, n in enumerate(part_sizes(row_counts, part_rows)) if owns(index))
