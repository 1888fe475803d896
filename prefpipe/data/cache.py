"""The Parquet cache: schema, atomic writes, reading and validation. Both phases import this module.

Layout: a directory holding ``part-NNNNN.parquet`` files and a ``manifest.json``. Each part covers one block of
input rows and is written atomically (temp file, then rename), so a killed run leaves only whole parts behind
and a rerun continues after them. The manifest is written last, also atomically; a directory without one is an
unfinished cache and is refused. Every part also carries the run's metadata in its Parquet key-value metadata
under the key ``prefpipe``; resume reads it there, but `read_cache` takes the metadata from the manifest alone, so
a part rewritten by another tool (polars drops key-value metadata) still loads. Such a part is still checked
against the manifest (its row count) and its columns are cast back to the cache schema: polars writes
``large_string`` and ``large_list``, and a rewrite may widen the lengths to int64. A column that is missing, or
that cannot be cast without loss, is a `UserError` naming the part and the column.

Columns, paired (DPO family; ORPO caches may lack the ``ref_*`` columns):
    row_id string, prompt_ids/chosen_ids/rejected_ids list<int32>, ref_chosen/ref_rejected float64 (summed
    reference log-probs), chosen_len/rejected_len int32 (scored response tokens).
Columns, unpaired (KTO): one row per example:
    row_id string, prompt_ids/completion_ids list<int32>, label bool, ref_logp float64, completion_len int32,
    and the pinned mismatched partner: kl_row_id string, kl_completion_ids list<int32> (the partner's
    completion, truncated to fit this prompt), ref_kl float64 (reference log-prob of that completion under
    this row's prompt).
Per-token columns (only in a cache written with ``precompute --per_token``; the metadata then says
``per_token: true``): next to each summed reference column ``X``, ``X_tokens`` list<float32> holds the reference
log-prob of each scored response token, in order (``ref_chosen_tokens``, ``ref_rejected_tokens``,
``ref_logp_tokens``, ``ref_kl_tokens``). The float64 sums stay the source of truth for the sums; the per-token
values serve losses that weigh tokens differently (LD-DPO) and the drift check's worst token. They are not part of
the content digests (like the token ids, they are lists), but `read_cache` checks that each list has one value per
scored token and that every value is finite.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefpipe.data import identity
from prefpipe.data.identity import SCHEMA_VERSION
from prefpipe.data.mapped import map_ipc_file
from prefpipe.errors import UserError
from prefpipe.fileio import atomic_write_bytes, atomic_write_with, guarded_write

# What a failed cache write leaves (parts are whole or absent, and resume keeps every finished one).
PARTS_KEPT = "the cache's finished parts are kept: free space, then rerun the same command to continue"

META_KEY = b"prefpipe"
MANIFEST = "manifest.json"
IDS = pa.list_(pa.int32())
TOKEN_LOGPS = pa.list_(pa.float32())

PAIRED_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("prompt_ids", IDS), ("chosen_ids", IDS), ("rejected_ids", IDS),
    ("ref_chosen", pa.float64()), ("ref_rejected", pa.float64()),
    ("chosen_len", pa.int32()), ("rejected_len", pa.int32()),
])
UNPAIRED_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("prompt_ids", IDS), ("completion_ids", IDS), ("label", pa.bool_()),
    ("ref_logp", pa.float64()), ("completion_len", pa.int32()),
    ("kl_row_id", pa.string()), ("kl_completion_ids", IDS), ("ref_kl", pa.float64()),
])


@dataclass(frozen=True)
class Response:
    """One scored response of a cache row: its id column, its summed reference log-prob column, its scored
    token count column (None for the KTO partner, whose length is len(ids)), and its per-token reference log-prob
    column (present only in a `--per_token` cache)."""
    name: str
    ids: str
    ref: str
    length: str | None
    tokens: str | None = None


@dataclass(frozen=True)
class CacheKind:
    """What a cache of one kind holds. Every consumer iterates over `responses` instead of naming columns."""
    name: str  # "paired" | "unpaired" (the manifest's `kind`)
    responses: tuple  # of Response, each scored after the row's prompt_ids
    schema: pa.Schema

    @property
    def ref_columns(self) -> tuple:
        return tuple(r.ref for r in self.responses)

    @property
    def token_columns(self) -> tuple:
        return tuple(r.tokens for r in self.responses)

    def response(self, name: str) -> Response:
        return next(r for r in self.responses if r.name == name)


PAIRED = CacheKind("paired", (Response("chosen", "chosen_ids", "ref_chosen", "chosen_len", "ref_chosen_tokens"),
                              Response("rejected", "rejected_ids", "ref_rejected", "rejected_len",
                                       "ref_rejected_tokens")), PAIRED_SCHEMA)
UNPAIRED = CacheKind("unpaired", (Response("completion", "completion_ids", "ref_logp", "completion_len",
                                           "ref_logp_tokens"),
                                  Response("kl", "kl_completion_ids", "ref_kl", None, "ref_kl_tokens")),
                     UNPAIRED_SCHEMA)
KINDS = {k.name: k for k in (PAIRED, UNPAIRED)}


def schema_for(kind: str, with_reference: bool = True, per_token: bool = False) -> pa.Schema:
    """The columns of a cache of `kind`; per-token columns (appended after the others) only with `per_token`,
    which needs `with_reference`."""
    schema = KINDS[kind].schema
    if not with_reference:
        drop = set(KINDS[kind].ref_columns)
        schema = pa.schema([f for f in schema if f.name not in drop])
    elif per_token:
        schema = pa.schema(list(schema) + [pa.field(c, TOKEN_LOGPS) for c in KINDS[kind].token_columns])
    return schema


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_part(path: str | Path, columns: dict, kind: str, metadata: dict, with_reference: bool = True,
               per_token: bool = False) -> int:
    """Write one part atomically. `columns` maps column name to a Python list or Arrow array."""
    path = Path(path)
    schema = schema_for(kind, with_reference, per_token)
    table = pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)
    table = table.replace_schema_metadata({META_KEY: json.dumps(metadata, sort_keys=True).encode()})
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"),
                      kept=PARTS_KEPT)
    return table.num_rows


def read_part_metadata(path: str | Path) -> dict | None:
    """The part's metadata, or None when the file is not a complete, readable part."""
    try:
        md = pq.read_schema(path).metadata or {}
        return json.loads(md[META_KEY]) if META_KEY in md else None
    except (pa.ArrowInvalid, OSError, ValueError):
        return None


def content_digest(table: pa.Table, kind: str) -> dict:
    """{column: sha256} over a part's values that say which rows it holds and what the reference scored them: each
    scalar column of the cache schema present in `table` (row ids, reference log-probs, lengths, KTO labels), its
    values in order (text as UTF-8 followed by a NUL, numbers as the little-endian bytes of the schema's type).

    It hashes values, not file bytes, so a part rewritten by another tool (polars writes the same values with other
    Arrow types and row groups) keeps its digest, while a part copied in from another model's or dataset's cache
    does not. One digest per column lets a reader that loads only some columns check those. Token id lists are
    left out: they cost most to hash, and precompute never writes other ids under the same row ids."""
    import hashlib

    import numpy as np

    out = {}
    for f in KINDS[kind].schema:
        if pa.types.is_list(f.type) or f.name not in table.column_names:
            continue
        col = table.column(f.name).cast(f.type).combine_chunks()
        h = hashlib.sha256()
        if pa.types.is_string(f.type):
            for v in col.to_pylist():
                h.update(v.encode() + b"\0")
        else:
            little = np.dtype(f.type.to_pandas_dtype()).newbyteorder("<")
            h.update(col.to_numpy(zero_copy_only=False).astype(little).tobytes())
        out[f.name] = h.hexdigest()
    return out


def part_digest(path: str | Path, kind: str) -> str:
    """`content_digest` of the part file at `path` (reads only the scalar columns)."""
    names = [f.name for f in KINDS[kind].schema if not pa.types.is_list(f.type)]
    present = set(pq.read_schema(path).names)
    return content_digest(pq.read_table(path, columns=[n for n in names if n in present]), kind)


def write_manifest(cache_dir: str | Path, metadata: dict, parts: list[dict]):
    """`parts`: one {"file", "rows", "content_sha256", "identity"} per part; read_cache checks each part's values
    against its digest, so a part changed or copied in after the cache was finished is refused."""
    manifest = {"schema_version": SCHEMA_VERSION, "metadata": metadata, "parts": parts}
    atomic_write_bytes(Path(cache_dir) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode(),
                       kept=PARTS_KEPT.replace("to continue", "to write the manifest"))


@dataclass
class Cache:
    path: Path
    table: pa.Table
    metadata: dict

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def spec(self) -> CacheKind:
        return KINDS[self.kind]

    @property
    def has_reference(self) -> bool:
        return all(c in self.table.column_names for c in self.spec.ref_columns)

    @property
    def has_per_token(self) -> bool:
        """The cache was written with `--per_token` (its per-token columns may not all be loaded)."""
        return bool(self.metadata.get("per_token", False))


def read_manifest(cache_dir: str | Path) -> dict:
    d = Path(cache_dir)
    mpath = d / MANIFEST
    if not d.exists():
        raise UserError("no such cache", file=str(d))
    if not mpath.exists():
        raise UserError("not a finished cache: manifest.json is missing (an interrupted precompute? "
                        "rerun the same command to finish it)", file=str(d))
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"manifest is corrupted ({e})", file=str(mpath))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"cache schema version {manifest.get('schema_version')} is not supported "
                        f"(this prefpipe reads version {SCHEMA_VERSION}); rerun precompute", file=str(mpath))
    _check_identity(manifest, d, mpath)
    return manifest


def _check_identity(manifest: dict, d: Path, mpath: Path):
    """Refuse a manifest whose identity fields (`identity.FIELDS`) are not those its parts were written with.

    Every reader believes the manifest's metadata (inspect, train, the pipeline's reuse, eval, verify, all through
    `read_manifest`), and the part values' digests do not cover it. Each part's manifest entry records the identity
    digest of the metadata the manifest was written from, so an unchanged manifest costs no file reads; on a
    mismatch the part's own metadata (its Parquet key-value metadata) names the edited field and its true value."""
    meta = manifest.get("metadata") or {}
    digest = identity.key(identity.identity_of(meta))
    for part in manifest.get("parts") or []:
        recorded = part.get("identity")
        if recorded == digest:
            continue
        part_meta = read_part_metadata(d / part["file"]) if "file" in part else None
        edited = identity.edited_field(meta, part_meta) if part_meta is not None else None
        if edited is not None:
            field, mine, theirs = edited
            raise UserError(f"manifest field {field} is {json.dumps(mine)}, but its parts were written with "
                            f"{json.dumps(theirs)} (edited by hand?); restore it, or rerun the precompute that "
                            "wrote this cache to rewrite the manifest from its parts", file=str(mpath))
        if part_meta is None and recorded is not None:  # a part rewritten without its metadata (polars)
            raise UserError(f"manifest identity fields do not match the identity digest recorded for its parts "
                            f"(manifest {digest[:12]}, parts {recorded[:12]}; edited by hand?); restore them, or "
                            "rerun the precompute that wrote this cache", file=str(mpath))


def read_cache(cache_dir: str | Path, columns: list[str] | None = None, *, memory_map: bool = False) -> Cache:
    """Read and validate a finished cache; any damage raises `UserError` naming the part and row.

    `memory_map=True` (training, `inspect`): each validated part is written uncompressed to an Arrow IPC file in
    the temporary directory (`TMPDIR`), mapped, and unlinked, so the table's values live in the page cache rather
    than in the process: memory grows with the rows a step touches, not with the cache (one part at a time is
    decompressed while reading). The values are the same either way."""
    d = Path(cache_dir)
    manifest = read_manifest(d)
    meta = manifest["metadata"]
    schema = schema_for(meta["kind"], meta.get("has_reference", True), meta.get("per_token", False))
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    tables = []
    for part in manifest["parts"]:
        p = d / part["file"]
        if not p.exists():
            raise UserError("cache part listed in the manifest is missing", file=str(p))
        try:
            with pq.ParquetFile(p) as pf:
                # Only the columns this reader knows; a missing one is named by _conform, not reported as damage.
                t = pf.read(columns=[c for c in schema.names if c in pf.schema_arrow.names])
        except (pa.ArrowInvalid, OSError) as e:
            raise UserError(f"cache part is truncated or corrupted ({e})", file=str(p))
        if t.num_rows != part["rows"]:
            raise UserError(f"cache part has {t.num_rows} rows, the manifest says {part['rows']}", file=str(p))
        t = _conform(t, schema, p)
        _check_finite(t, meta["kind"], p)
        _check_token_lists(t, meta["kind"], p)
        _check_part_content(t, meta["kind"], p, part)  # after the checks above, which name a damaged part's row more precisely
        tables.append(_mapped(t) if memory_map else t)
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return Cache(d, table, meta)


def _mapped(table: pa.Table) -> pa.Table:
    """`table` again, backed by a memory-mapped, already unlinked Arrow IPC file (the mapping keeps it alive)."""
    import os
    import tempfile

    fd, name = tempfile.mkstemp(prefix="prefpipe-cache-", suffix=".arrow")
    try:
        with guarded_write(name, "the cache is unchanged; set TMPDIR to a directory with space (the cache is "
                                 "mapped from files there)"), os.fdopen(fd, "wb") as f, \
                pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        return map_ipc_file(name)  # a mapping whose pages can be released (see there)
    finally:
        Path(name).unlink(missing_ok=True)


def _conform(table: pa.Table, schema: pa.Schema, path: Path) -> pa.Table:
    """`table` with exactly `schema`'s columns and types, so parts written by different tools concatenate."""
    arrays = []
    for f in schema:
        if f.name not in table.column_names:
            raise UserError("cache part lacks this column; rerun precompute", file=str(path), column=f.name)
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)  # safe cast: an int64 length that does not fit int32 is refused
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise UserError(f"cache part column has type {col.type}, expected {f.type}, and cannot be "
                                f"converted ({' '.join(str(e).split())})", file=str(path), column=f.name)
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=schema)


def _check_part_content(table: pa.Table, kind: str, path: Path, part: dict):
    # Caches written before the manifest recorded digests carry none; their parts are read as they are.
    recorded = part.get("content_sha256") or {}
    changed = [c for c, digest in content_digest(table, kind).items() if c in recorded and recorded[c] != digest]
    if changed:
        raise UserError(f"cache part changed after the cache was finished: its {', '.join(changed)} differ from "
                        "what the manifest recorded (copied in from another cache, or edited?); rerun precompute",
                        file=str(path))


def _check_finite(table: pa.Table, kind: str, path: Path):
    for col in KINDS[kind].ref_columns:
        if col not in table.column_names:
            continue
        arr = table.column(col)
        bad = pc.invert(pc.is_finite(arr))
        if arr.null_count or pc.any(bad).as_py():
            idx = next(i for i, v in enumerate(arr.to_pylist()) if v is None or not math.isfinite(v))
            raise UserError(f"reference log-prob is {arr[idx].as_py()} (NaN, inf or null); the cache is "
                            "unusable, rerun precompute", file=str(path), row=idx + 1, column=col)


def _check_token_lists(table: pa.Table, kind: str, path: Path):
    """Each per-token list has one finite value per scored token of its response."""
    import numpy as np

    for r in KINDS[kind].responses:
        if r.tokens not in table.column_names:
            continue
        col = table.column(r.tokens).combine_chunks()
        lengths = pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False)
        if r.length and r.length in table.column_names:
            want = table.column(r.length).combine_chunks()
        elif r.ids in table.column_names:  # the KTO partner: every id of its completion is scored
            want = pc.list_value_length(table.column(r.ids).combine_chunks())
        else:
            want = None  # a reader that loaded neither cannot check the count
        if want is not None:
            bad = np.flatnonzero(lengths != want.to_numpy(zero_copy_only=False))
            if bad.size:
                i = int(bad[0])
                raise UserError(f"per-token reference log-probs hold {lengths[i]} values for a response of "
                                f"{want[i].as_py()} scored tokens; rerun precompute", file=str(path), row=i + 1,
                                column=r.tokens)
        values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        if not np.isfinite(values).all():
            i = int(np.searchsorted(np.cumsum(lengths), np.flatnonzero(~np.isfinite(values))[0], side="right"))
            raise UserError("a per-token reference log-prob is NaN or inf; the cache is unusable, rerun "
                            "precompute", file=str(path), row=i + 1, column=r.tokens)


def part_is_sound(path: str | Path, meta: dict) -> bool:
    """Whether a part file (whose metadata is `meta`) passes the checks `read_cache` makes of its rows: its row
    count, finite reference log-probs and per-token lists of the right lengths. A resume rescores a part that
    does not."""
    import pyarrow.parquet as pq

    f = Path(path)
    try:
        present = set(pq.read_schema(f).names)
        spec = KINDS[meta["kind"]]
        wanted = spec.ref_columns + spec.token_columns + tuple(r.length for r in spec.responses if r.length)
        if meta.get("per_token") and not set(spec.token_columns) <= present:
            return False
        table = pq.read_table(f, columns=[c for c in wanted if c in present])
        if pq.read_metadata(f).num_rows != meta["part"].get("rows_written"):
            return False
        _check_finite(table, meta["kind"], f)
        _check_token_lists(table, meta["kind"], f)
    except (UserError, pa.ArrowInvalid, OSError, KeyError):
        return False
    return True
