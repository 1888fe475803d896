"""Writing a generate output (the layout is prefpipe.data.generated's): sample parts, each written atomically
with the run key in its Parquet metadata, so a rerun keeps the parts of the same run and refuses another run's;
then pairs, the KTO view and, last, the manifest."""

from __future__ import annotations

import json
from pathlib import Path

from prefpipe.data.generated import KTO_FILE, MANIFEST, PAIRS_FILE, SAMPLES_DIR
from prefpipe.errors import UserError
from prefpipe.fileio import atomic_write_text, atomic_write_with, is_lock_file
from prefpipe.generation.samples import SAMPLE_COLUMNS, Sample

KEY_FIELD = b"prefpipe_generate_key"
BINARY_FIELD = b"prefpipe_judge_binary"  # the judge's rewards were 0/1 (which picks the default pairing rule)


def part_path(out: Path, index: int) -> Path:
    return out / SAMPLES_DIR / f"part-{index:05d}.parquet"


def _schema():
    import pyarrow as pa
    ids = pa.list_(pa.int32())
    return pa.schema([("prompt_index", pa.int64()), ("row_id", pa.string()), ("sample_index", pa.int32()),
                      ("prompt", pa.string()), ("prompt_ids", ids), ("completion", pa.string()),
                      ("completion_ids", ids), ("finish_reason", pa.string()), ("reward", pa.float64()),
                      ("row", pa.string())])


def _write_table(path: Path, columns: dict, schema, key: str, extra: dict | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns, schema=schema.with_metadata({KEY_FIELD: key.encode(), **(extra or {})}))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp))


def write_part(out: Path, index: int, samples: list[Sample], key: str, *, binary: bool):
    cols = {c: [] for c in SAMPLE_COLUMNS}
    for s in samples:
        for c in SAMPLE_COLUMNS:
            v = getattr(s, c)
            cols[c].append(json.dumps(v, ensure_ascii=False, default=str) if c in ("prompt", "row") else v)
    _write_table(part_path(out, index), cols, _schema(), key, {BINARY_FIELD: b"1" if binary else b"0"})


def read_part(path: Path) -> tuple[list[Sample], bool]:
    """A part's samples and whether its judge's rewards were 0/1."""
    import pyarrow.parquet as pq
    table = pq.read_table(path)
    out = []
    for r in table.to_pylist():
        r["prompt"], r["row"] = json.loads(r["prompt"]), json.loads(r["row"])
        out.append(Sample(**r))
    return out, (table.schema.metadata or {}).get(BINARY_FIELD) == b"1"


def part_key(path: Path) -> str | None:
    """The run key a part was written with, or None when it is not a readable part."""
    import pyarrow.parquet as pq
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # noqa: BLE001 - a torn or foreign file: not a part of this run
        return None
    key = meta.get(KEY_FIELD)
    return key.decode() if key else None


def finished_parts(out: Path, key: str, n_parts: int, overwrite: bool) -> set[int]:
    """Indices of this run's parts already in `out`; another run's part is refused (or, with `overwrite`, the old
    output is cleared). A non-empty directory that is no generate output is refused."""
    if not out.is_dir():
        return set()
    ours = {SAMPLES_DIR, MANIFEST, PAIRS_FILE, KTO_FILE}
    strangers = sorted(p.name for p in out.iterdir() if p.name not in ours and not is_lock_file(p.name))
    if strangers:
        raise UserError(f"--out holds files that are not a generate output ({', '.join(strangers[:3])}); give a "
                        "new or empty directory", file=str(out))
    done = set()
    for i in range(n_parts):
        p = part_path(out, i)
        if not p.exists():
            continue
        if part_key(p) == key:
            done.add(i)
        elif overwrite:
            p.unlink()
        else:
            raise UserError("--out holds samples of another generate run (other model, data or settings); "
                            "rerun with --overwrite to replace them, or choose another --out", file=str(p))
    for extra in sorted((out / SAMPLES_DIR).glob("part-*.parquet")) if (out / SAMPLES_DIR).is_dir() else []:
        if int(extra.stem.split("-")[1]) >= n_parts and part_key(extra) != key:
            if not overwrite:
                raise UserError("--out holds samples of another generate run; rerun with --overwrite to replace "
                                "them, or choose another --out", file=str(extra))
            extra.unlink()
    if overwrite or len(done) < n_parts:
        for name in (MANIFEST, PAIRS_FILE, KTO_FILE):
            (out / name).unlink(missing_ok=True)  # rewritten at the end; until then the output reads as unfinished
    return done


def _pair_columns(pairs: list[tuple[Sample, Sample]]) -> dict:
    import hashlib
    cols = {c: [] for c in ("prompt_index", "row_id", "prompt", "chosen", "rejected", "prompt_ids", "chosen_ids",
                            "rejected_ids", "chosen_reward", "rejected_reward", "chosen_finish", "rejected_finish")}
    for c, r in pairs:
        rid = hashlib.sha256(f"{c.row_id}\x1f{c.sample_index}\x1f{r.sample_index}".encode()).hexdigest()[:16]
        for k, v in (("prompt_index", c.prompt_index), ("row_id", rid),
                     ("prompt", json.dumps(c.prompt, ensure_ascii=False)), ("chosen", c.completion),
                     ("rejected", r.completion), ("prompt_ids", c.prompt_ids), ("chosen_ids", c.completion_ids),
                     ("rejected_ids", r.completion_ids), ("chosen_reward", c.reward), ("rejected_reward", r.reward),
                     ("chosen_finish", c.finish_reason), ("rejected_finish", r.finish_reason)):
            cols[k].append(v)
    return cols


def _kto_columns(rows: list[tuple[Sample, bool]]) -> dict:
    import hashlib
    cols = {c: [] for c in ("prompt_index", "row_id", "prompt", "completion", "label", "prompt_ids",
                            "completion_ids", "reward", "finish_reason")}
    for s, label in rows:
        rid = hashlib.sha256(f"{s.row_id}\x1f{s.sample_index}".encode()).hexdigest()[:16]
        for k, v in (("prompt_index", s.prompt_index), ("row_id", rid),
                     ("prompt", json.dumps(s.prompt, ensure_ascii=False)), ("completion", s.completion),
                     ("label", label), ("prompt_ids", s.prompt_ids), ("completion_ids", s.completion_ids),
                     ("reward", s.reward), ("finish_reason", s.finish_reason)):
            cols[k].append(v)
    return cols


def write_views(out: Path, pairs: list, kto: list, key: str):
    import pyarrow as pa
    ids = pa.list_(pa.int32())
    pair_schema = pa.schema([("prompt_index", pa.int64()), ("row_id", pa.string()), ("prompt", pa.string()),
                             ("chosen", pa.string()), ("rejected", pa.string()), ("prompt_ids", ids),
                             ("chosen_ids", ids), ("rejected_ids", ids), ("chosen_reward", pa.float64()),
                             ("rejected_reward", pa.float64()), ("chosen_finish", pa.string()),
                             ("rejected_finish", pa.string())])
    kto_schema = pa.schema([("prompt_index", pa.int64()), ("row_id", pa.string()), ("prompt", pa.string()),
                            ("completion", pa.string()), ("label", pa.bool_()), ("prompt_ids", ids),
                            ("completion_ids", ids), ("reward", pa.float64()), ("finish_reason", pa.string())])
    _write_table(out / PAIRS_FILE, _pair_columns(pairs), pair_schema, key)
    _write_table(out / KTO_FILE, _kto_columns(kto), kto_schema, key)


def write_manifest(out: Path, manifest: dict):
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
