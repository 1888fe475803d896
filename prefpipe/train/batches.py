"""Training examples: where they come from, the eval split, the data order, and padded batches.

Decisions a user may want to know:

- **Ids come from the cache** when `--cache` is given, exactly the ids the reference scored. With `--data` the
  rows are tokenized here with the policy's tokenizer and the same rules as precompute (`--max_length`,
  `--max_prompt_length`); KTO examples and their pinned mismatched partners are then built with precompute's
  rule over the whole dataset.
- **Eval split** (`--eval_fraction F`): rows are ordered by a hash of their row id and the first `round(F * n)`
  (at least one) are held out. The split does not depend on `--seed`, so every run of a sweep and every seed
  evaluates on the same rows. The two KTO examples made from one pair (`<row_id>:chosen`, `<row_id>:rejected`)
  always land on the same side.
- **Order.** Each epoch is a fresh permutation drawn from `--seed` and the epoch number. A step takes the next
  global batch of `batch_size x grad_accum x processes` rows; rows that do not fill a last global batch sit out
  that epoch (the count is logged), and the next epoch's permutation includes them again. Within a global batch
  micro-batch k of process r holds rows `[(k * processes + r) * batch_size, ... + batch_size)`, so the rows of a
  step are the same whatever the number of processes.
- **Loading.** Training micro-batches come from a `DataLoader` (`RowsDataset`, `StepSampler`) in exactly that
  order. On GPU one worker process packs (or pads) the next micro-batches while the current step runs; on CPU they
  are built on the main thread, since a worker would compete with the step for the same cores, and building one
  (packed or padded) takes a few milliseconds against steps of seconds (bench/train_packing.py measures both).
- **Packing** (`--padding_free`, the default where the model allows it): every sequence a forward scores
  (chosen and rejected of every pair, or the KTO examples; the KTO partners in their own no-gradient forward)
  is laid end to end in ONE row of `sum(lengths)` tokens, with no padding; `seq_lens` gives each sequence's
  length and the model sees position ids that restart per sequence (see `logprobs.packed_sequence_logprobs`).
  Per-sequence scores, the rows of a step and every loss are those of the padded layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import pyarrow as pa
import torch

from prefpipe.data.mapped import take_rows
from prefpipe.errors import UserError
from prefpipe.logprobs import pad_batch
from prefpipe.wording import plural


@dataclass
class TrainData:
    kind: str  # "paired" | "unpaired" (KTO examples)
    table: pa.Table
    has_reference: bool
    origin: str  # the cache directory or data path, for messages
    metadata: dict | None = None  # the cache's metadata; None for --data
    notes: tuple = ()  # what loading did (counts, skips), printed once
    has_per_token: bool = False  # per-token reference columns (a `--per_token` cache)

    def __len__(self):
        return self.table.num_rows


def load_train_data(src, tokenizer, kto: bool) -> TrainData:
    """Read `src.cache`, or tokenize `src.data`. `kto` asks for KTO examples (unpaired kind)."""
    if src.cache:
        from prefpipe.data.cache import read_cache
        cache = read_cache(src.cache, memory_map=True)  # memory grows with the rows a step touches
        if kto and cache.kind != "unpaired":
            raise UserError("KTO trains on single examples with pinned mismatched partners, but this cache holds "
                            "pairs; precompute it with --kto (or pass unpaired data)", file=src.cache)
        if not kto and cache.kind != "paired":
            raise UserError("this is a KTO cache of single examples; the paired losses need a paired cache",
                            file=src.cache)
        counts = cache.metadata.get("counts") or {}
        notes = (f"cache: {cache.table.num_rows} {'examples' if kto else 'pairs'} from {src.cache}"
                 + (f" ({counts.get('rows_skipped', 0)} input rows were skipped in precompute)" if counts else ""),)
        return TrainData(cache.kind, cache.table, cache.has_reference, src.cache, cache.metadata, notes,
                         cache.has_per_token)
    return _tokenize_data(src, tokenizer, kto)


def _tokenize_data(src, tokenizer, kto: bool) -> TrainData:
    from prefpipe.data.cache import schema_for
    from prefpipe.data.tokenize import PairTokenizer, TokenStats
    from prefpipe.data import kto_pairs

    ds = src.input.dataset(src.data, kto_view=kto)
    ds.validate()  # every bad row at once, before the policy is loaded
    if not kto and not ds.paired:
        raise UserError("unpaired (prompt/completion/label) data trains only with --loss_type kto", file=src.data)
    ds.check_tokenizer(tokenizer)
    pt = PairTokenizer(tokenizer, src.input.tokenize_settings())
    stats = TokenStats()
    cols: dict[str, list] = {}
    for records in ds.batches():
        for k, v in pt.tokenize(records, stats, ds.paired).items():
            cols.setdefault(k, []).extend(v)
    if not cols.get("row_id"):
        raise UserError(f"no usable rows: all {stats.rows_read} were skipped ({dict(stats.skipped)})", file=src.data)
    kind = "paired"
    if kto:
        kind = "unpaired"
        cols = kto_pairs.examples_from(cols, ds.paired)
        if len(cols["row_id"]) < 2:
            raise UserError("KTO needs at least two examples (each borrows another's completion)", file=src.data)
        cols, _ = kto_pairs.with_partners(cols, src.input.max_length, None)
    else:
        cols["chosen_len"] = [len(x) for x in cols["chosen_ids"]]
        cols["rejected_len"] = [len(x) for x in cols["rejected_ids"]]
    if kind == "unpaired":
        cols["completion_len"] = [len(x) for x in cols["completion_ids"]]
    schema = schema_for(kind, with_reference=False)
    table = pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in schema}, schema=schema)
    skipped = sum(stats.skipped.values())
    note = (f"data: {plural(stats.rows_read, 'row')} read from {src.data}, {stats.rows_kept} kept, {skipped} skipped"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(stats.skipped.items()))})" if skipped else ""))
    return TrainData(kind, table, False, src.data, None, (note,))


def split_eval(data: TrainData, fraction: float):
    """(train row indices, eval row indices), eval chosen by row-id hash (see the module docstring).

    The train indices are a read-only int64 numpy array (a million rows cost 8 MB, not a Python list of ints);
    the eval indices a list. Row ids are hashed one Arrow chunk at a time, never as one Python list."""
    import numpy as np

    n = len(data)
    if fraction <= 0:
        rows = np.arange(n, dtype=np.int64)
        rows.flags.writeable = False
        return rows, []
    # The first 8 bytes of each group's sha256, big-endian: ordering by them is ordering by the hex digest (a tie
    # between two different row ids has probability ~n^2 / 2^64).
    keys = np.empty(n, dtype=np.uint64)
    at = 0
    for chunk in data.table.column("row_id").chunks:
        vals = chunk.to_pylist()
        keys[at:at + len(vals)] = [int.from_bytes(hashlib.sha256(f"eval\x1f{rid.split(':', 1)[0]}".encode())
                                                  .digest()[:8], "big") for rid in vals]
        at += len(vals)
    groups = np.unique(keys)
    n_eval = max(1, round(fraction * len(groups)))
    held = keys <= groups[n_eval - 1]
    train = np.flatnonzero(~held)
    train.flags.writeable = False
    return train, np.flatnonzero(held).tolist()


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
    from prefpipe.data.cache import PAIRED, UNPAIRED
    from prefpipe.train.registry import CHOSEN, EXAMPLES
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


def train_loader(dataset: RowsDataset, sampler: StepSampler, workers: int) -> torch.utils.data.DataLoader:
    """Micro-batches built in `workers` background processes (0: on the calling thread), two ahead per worker.
    A private generator keeps the loader from drawing on the global torch RNG, which checkpoints save."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=dataset.collate,
                                       num_workers=workers, generator=torch.Generator(),
                                       persistent_workers=False)
