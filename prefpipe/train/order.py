"""The data order of a run: which rows each optimizer step and each process takes.

- **Order.** Each epoch is a fresh permutation drawn from `--seed` and the epoch number. A step takes the next
  global batch of `batch_size x grad_accum x processes` rows; rows that do not fill a last global batch sit out
  that epoch (the count is logged), and the next epoch's permutation includes them again. Within a global batch
  micro-batch k of process r holds rows `[(k * processes + r) * batch_size, ... + batch_size)`, so the rows of a
  step are the same whatever the number of processes. `StepSampler` hands a `DataLoader` exactly that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Order:
    """The data order of a run: global batches drawn from per-epoch permutations of the training rows."""
    rows: object  # training row indices into the table (a sequence: tuple or read-only numpy array)
    global_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.global_batch

    def global_rows(self, step: int) -> list[int]:
        """Table row indices of 0-based optimizer step `step`."""
        epoch, b = divmod(step, self.steps_per_epoch)
        perm = _permutation(len(self.rows), self.seed * 1_000_003 + epoch)
        return [int(self.rows[i]) for i in perm[b * self.global_batch:(b + 1) * self.global_batch].tolist()]


@lru_cache(maxsize=2)
def _permutation(n: int, seed: int) -> torch.Tensor:
    # A tensor, not a list: a million-row epoch costs 8 MB rather than ~36 MB of Python ints.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def micro_batches(rows: list[int], batch_size: int, grad_accum: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of one global batch."""
    return [rows[(k * world + rank) * batch_size:(k * world + rank + 1) * batch_size] for k in range(grad_accum)]


def eval_batches(rows: list[int], batch_size: int, world: int, rank: int) -> list[tuple[list[int], bool]]:
    """This process's eval micro-batches as (rows, real). Every process gets the same number of batches (FSDP
    ranks must run forwards in lockstep); a process with nothing left gets one row back with real=False, and its
    results are discarded."""
    out = []
    span = batch_size * world
    for start in range(0, len(rows), span):
        chunk = rows[start:start + span][rank * batch_size:(rank + 1) * batch_size]
        out.append((chunk, True) if chunk else ([rows[start]], False))
    return out


class StepSampler(torch.utils.data.Sampler):
    """This process's micro-batches (lists of row indices) for optimizer steps `start .. total - 1`, in the
    order of `Order.global_rows` and `micro_batches`: `grad_accum` of them per step."""

    def __init__(self, order: Order, start: int, total: int, batch_size: int, grad_accum: int, world: int,
                 rank: int):
        self.order, self.start, self.total = order, start, total
        self.split = (batch_size, grad_accum, world, rank)

    def __len__(self):
        return (self.total - self.start) * self.split[1]

    def __iter__(self):
        for step in range(self.start, self.total):
            yield from micro_batches(self.order.global_rows(step), *self.split)
