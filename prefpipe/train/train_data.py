"""Training examples: where they come from and the eval split.

- **Ids come from the cache** when `--cache` is given, exactly the ids the reference scored. With `--data` the
  rows are tokenized here with the policy's tokenizer and the same rules as precompute (`--max_length`,
  `--max_prompt_length`); KTO examples and their pinned mismatched partners are then built with precompute's
  rule over the whole dataset.
- **Eval split** (`--eval_fraction F`): rows are ordered by a hash of their row id and the first `round(F * n)`
  (at least one) are held out. The split does not depend on `--seed`, so every run of a sweep and every seed
  evaluates on the same rows. The two KTO examples made from one pair (`<row_id>:chosen`, `<row_id>:rejected`)
  always land on the same side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa

from prefpipe.data import kto_pairs
from prefpipe.data.cache import read_cache, schema_for
from prefpipe.data.tokenize import PairTokenizer, TokenStats
from prefpipe.errors import UserError
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
