"""Padded (or packed) batches of training rows, and the loader that builds them.

- **Loading.** Training micro-batches come from a `DataLoader` (`RowsDataset`, `prefpipe.train.order.StepSampler`)
  in the order `prefpipe.train.order` documents. On GPU one worker process packs (or pads) the next micro-batches
  while the current step runs; on CPU they are built on the main thread, since a worker would compete with the
  step for the same cores, and building one (packed or padded) takes a few milliseconds against steps of seconds
  (bench/train_packing.py measures both).
- **Packing** (`--padding_free`, the default where the model allows it): every sequence a forward scores
  (chosen and rejected of every pair, or the KTO examples; the KTO partners in their own no-gradient forward)
  is laid end to end in ONE row of `sum(lengths)` tokens, with no padding; `seq_lens` gives each sequence's
  length and the model sees position ids that restart per sequence (see `logprobs.packed_sequence_logprobs`).
  Per-sequence scores, the rows of a step and every loss are those of the padded layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import torch

from prefpipe.data.cache import PAIRED, UNPAIRED
from prefpipe.data.mapped import take_rows
from prefpipe.logprobs import pad_batch
from prefpipe.train.order import StepSampler
from prefpipe.train.registry import CHOSEN, EXAMPLES
from prefpipe.train.train_data import TrainData


@dataclass
class Batch:
    """Padded tensors for one micro-batch. Paired: the first half of `ids` are chosen sequences, the second half
    rejected (one concatenated forward); the chosen-only shape (sft) keeps only the chosen half. KTO: the examples,
    plus `kl_*` for the mismatched completions."""
    ids: torch.Tensor
    mask: torch.Tensor
    prompt_lens: torch.Tensor
    n: int  # rows (pairs or examples)
    ref: dict  # cache column -> [n] float32 tensor (empty without reference columns); per-token columns, when
    # the cache has them, -> [n, longest] float32, zero after each response's count
    label: torch.Tensor | None = None
    kl_ids: torch.Tensor | None = None
    kl_mask: torch.Tensor | None = None
    kl_prompt_lens: torch.Tensor | None = None
    tokens: int = 0  # real tokens the policy forwards (KL sequences included), counted on the host
    responses: tuple = ()  # the cache Responses whose sequences fill `ids`, in order
    # packed layout: `ids` (and `kl_ids`) is one [1, sum(seq_lens)] row, `mask` None, one length per sequence
    seq_lens: torch.Tensor | None = None
    kl_seq_lens: torch.Tensor | None = None

    def forward_inputs(self, kl: bool = False) -> tuple[tuple, dict]:
        """`(args, kwargs)` for a `Scorer` call on the batch's sequences (or its KTO partners with `kl`)."""
        if kl:
            args, lens = (self.kl_ids, self.kl_mask, self.kl_prompt_lens), self.kl_seq_lens
        else:
            args, lens = (self.ids, self.mask, self.prompt_lens), self.seq_lens
        return args, ({} if lens is None else {"seq_lens": lens})

    def cached_reference(self) -> torch.Tensor:
        """The cached reference sums aligned with the rows of `ids`."""
        return torch.cat([self.ref[r.ref] for r in self.responses])

    def to(self, device) -> Batch:
        def move(x):
            return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
        fields = {f: move(getattr(self, f)) for f in self.__dataclass_fields__ if f != "ref"}
        return Batch(**fields, ref={k: move(v) for k, v in self.ref.items()})


def make_batch(data: TrainData, rows: list[int], shape: str, pad_id: int, device,
               use_cached_reference: bool, pack: bool = False) -> Batch:
    """The micro-batch of table rows `rows` in `shape` (a `registry` batch shape); `pack`
    lays its sequences end to end in one row instead of padding them."""
    return collate_rows(take_rows(data.table, rows), shape, pad_id,
                        use_cached_reference, device, pack)


def pack_sequences(seqs: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids [1, sum(lengths)], seq_lens [S])`: the sequences end to end, no padding."""
    flat = [t for s in seqs for t in s]
    ids = torch.tensor([flat], dtype=torch.long, device=device)
    return ids, torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)


def collate_rows(t: pa.Table, shape: str, pad_id: int, use_cached_reference: bool, device=None,
                 pack: bool = False) -> Batch:
    prompts = t.column("prompt_ids").to_pylist()
    n = len(prompts)
    tokens = [0]

    def tensors(responses):
        seqs = [p + r for p, r in zip(prompts * (len(responses) // n), responses)]
        tokens[0] += sum(len(x) for x in seqs)
        plens = torch.tensor([len(p) for p in prompts] * (len(responses) // n), dtype=torch.long, device=device)
        if pack:
            ids, lens = pack_sequences(seqs, device)
            return (ids, None, plens), lens
        ids, mask = pad_batch(seqs, pad_id, device)
        return (ids, mask, plens), None

    kind = UNPAIRED if shape == EXAMPLES else PAIRED
    ref_cols = kind.ref_columns if use_cached_reference else ()
    ref = {c: torch.tensor(t.column(c).to_pylist(), dtype=torch.float32, device=device) for c in ref_cols}
    if use_cached_reference:
        ref.update({c: padded_lists(t.column(c), device) for c in kind.token_columns if c in t.column_names})
    if kind is PAIRED:
        forwarded = PAIRED.responses[:1] if shape == CHOSEN else PAIRED.responses
        responses = sum((t.column(r.ids).to_pylist() for r in forwarded), [])
        main, lens = tensors(responses)
        return Batch(*main, n=n, ref=ref, tokens=tokens[0], responses=forwarded, seq_lens=lens)
    own, kl = UNPAIRED.response("completion"), UNPAIRED.response("kl")
    label = torch.tensor(t.column("label").to_pylist(), dtype=torch.bool, device=device)
    (ids, mask, plens), lens = tensors(t.column(own.ids).to_pylist())
    (kl_ids, kl_mask, kl_plens), kl_lens = tensors(t.column(kl.ids).to_pylist())
    return Batch(ids, mask, plens, n, ref, label, kl_ids, kl_mask, kl_plens, tokens[0], (own,), lens, kl_lens)


def padded_lists(col, device=None) -> torch.Tensor:
    """A list<float> column as a `[rows, longest]` float32 tensor, zero after each row's values."""
    import numpy as np
    import pyarrow.compute as pc

    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    values = torch.from_numpy(pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32))
    out = torch.zeros(len(lengths), int(lengths.max()) if len(lengths) else 0)
    rows = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
    starts = torch.from_numpy(np.cumsum(lengths) - lengths)
    out[rows, torch.arange(values.shape[0]) - starts[rows]] = values
    return out.to(device) if device is not None else out


class RowsDataset(torch.utils.data.Dataset):
    """The training table for a `DataLoader` whose sampler yields whole micro-batches of row indices: fetching a
    micro-batch is one Arrow `take`, and `collate` packs or pads it (on the host, in the loader's worker when it
    has one; the loop moves it to the device)."""

    def __init__(self, data: TrainData, shape: str, pad_id: int, use_cached_reference: bool, pack: bool = False):
        self.table, self.shape, self.pad_id, self.cached = data.table, shape, pad_id, use_cached_reference
        self.pack = pack

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, i: int) -> pa.Table:
        return self.__getitems__([i])

    def __getitems__(self, rows: list[int]) -> pa.Table:
        return take_rows(self.table, rows)  # Table.take would join every part of a mapped cache first

    def collate(self, t: pa.Table) -> Batch:
        return collate_rows(t, self.shape, self.pad_id, self.cached, pack=self.pack)


def train_loader(dataset: RowsDataset, sampler: StepSampler, workers: int) -> torch.utils.data.DataLoader:
    """Micro-batches built in `workers` background processes (0: on the calling thread), two ahead per worker.
    A private generator keeps the loader from drawing on the global torch RNG, which checkpoints save."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate,
                                       num_workers=workers, generator=torch.Generator(),
                                       persistent_workers=False)
