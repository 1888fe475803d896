"""The total of the precompute progress bar: how many input rows this process will go through.

The rows of each source are counted by `Dataset.validate()`, the pass that reads every row before any model is
loaded, with the reader that scoring uses: so every input form (JSON Lines plain or gzipped, JSON arrays, Parquet,
Hugging Face datasets) has a total, and it is the reader's own count (blank lines are no rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def rows_to_process(row_counts: Sequence[int], part_rows: int, owns: Callable[[int], bool]) -> int:
    """Input rows in the parts `owns` accepts (all of them for a single process), given each source's rows.

    Parts are cut per file, `part_rows` at a time, numbered across files in order: the same layout the data reader
    produces, so under torchrun or --shard each process's bar ends at its own share."""
    total, index = 0, 0
    for n in row_counts:
        for start in range(0, n, part_rows):
            if owns(index):
                total += min(part_rows, n - start)
            index += 1
    return total
