"""Where preference rows come from: files, directories, globs and Hugging Face datasets, read as raw rows.

A `Source` is one file or one part of a Hugging Face dataset; `iter_raw` yields its rows as `(row number, dict)`
batches, before any shape is known (`prefpipe.data.formats` detects and checks the shape). Rows are numbered from
1 (for JSONL the row is the line number). Reading is batched, so memory does not grow with the number of rows (a
``.json`` array file is the exception: it is one document and is parsed whole). `BadRows` collects the bad rows
of one pass.

Files and what is made of them:

- ``.jsonl``/``.ndjson`` are read line by line with the standard ``json`` parser, never with pyarrow's JSON
  reader: that one infers column types per batch, so a response such as ``"2021-03-04"`` became a datetime when
  its batch happened to hold no other text, and ``data check`` and ``precompute`` (different batch sizes) could
  disagree about the same row. Every line must be UTF-8 (a leading byte-order mark is allowed).
- ``.json`` is one JSON array of objects (or ``{"any key": [...]}``). A ``.json`` file that is really JSON Lines
  (its first line is a whole object and more lines follow) is read as JSON Lines, streaming.
- Any of these with ``.gz`` appended (``.jsonl.gz``...) is decompressed on the fly, streaming.
- ``.parquet`` is read in record batches.
- A directory or a glob is expanded to its data files, sorted. Other files (``README.md``, ``.gitattributes``)
  and anything under a hidden directory (``.git/``, ``.ipynb_checkpoints/``, which may hold stale copies of the
  data) are not data: they are skipped and listed in `Dataset.skipped_files` for the caller to report. A single
  file named explicitly must be a data file.

Hugging Face datasets (read with the ``datasets`` library, imported only for these; ``split`` chooses the part,
default ``train``, and ``config`` the configuration, default none):

- A directory holding ``dataset_dict.json`` or ``state.json`` is a ``save_to_disk`` directory (a ``DatasetDict``
  or one ``Dataset``). One saved ``Dataset`` is one part: it is read when ``split`` is ``train`` or the split it
  recorded; it has no configs.
- A directory is a dataset repository folder, loaded with ``datasets.load_dataset(folder, config)``, when its
  ``README.md`` has a YAML header with a ``configs:`` block, when its file names name more than one split
  (``train``/``test``/``validation`` and their variants, as in ``data/train-00000-of-00001.parquet`` and
  ``data/test-....parquet``: reading them all would mix the splits), or when a split other than ``train`` or a
  config is asked for. Any other directory keeps the plain rule above: every data file in it, recursively.
- ``ORG/NAME`` that is no local path is a hub dataset id, read from the local Hugging Face hub cache
  (``HF_HUB_CACHE``, else ``HF_HOME/hub``; what ``hf download --repo-type dataset ORG/NAME`` or an online
  ``load_dataset`` leaves there) as a repository folder. Nothing is downloaded: an id that is not cached is a
  `UserError` saying how to fetch it.
- Rows are read in Arrow batches (memory does not grow with the number of rows); ``Record.source`` is
  ``DATA:SPLIT`` (``DATA:CONFIG:SPLIT`` with a config). Row ids and `data_fingerprint` hash no absolute path:
  they use the saved ``_fingerprint`` of a ``save_to_disk`` split, the bytes of a repository folder's files (its
  ``load_dataset`` fingerprint depends on where the folder lies), or a hub dataset's cached commit, plus the
  config and split.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from prefpipe.errors import UserError

# How many bad rows one error lists (the rest are counted): enough to show a pattern, short enough to read.
MAX_BAD_ROWS = 20
TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json")
DATA_SUFFIXES = (*TEXT_SUFFIXES, *(x + ".gz" for x in TEXT_SUFFIXES), ".parquet")
DEFAULT_SPLIT = "train"
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# The split names the hub's file-name convention recognises (a path part that is the word or starts with it
# followed by a separator or a digit), grouped by the split they mean.
SPLIT_WORDS = {"train": ("train", "training"), "test": ("test", "testing", "eval", "evaluation"),
               "validation": ("validation", "valid", "val", "dev")}


OnBadRow = Callable[[UserError], None] | None


@dataclass
class Source:
    path: Path
    name: str  # stable name shown in records: relative to the data root, never absolute
    key: str = ""  # what row ids hash: the name for files; fingerprint, config and split for HF datasets
    table: Any = None  # a `datasets.Dataset` for HF sources, read in Arrow batches

    def __post_init__(self):
        self.key = self.key or self.name

    @property
    def where(self) -> str:
        """How errors name the source: the file, or `DATA:SPLIT` for an HF dataset."""
        return self.name if self.table is not None else str(self.path)


def _is_data_file(rel: Path) -> bool:
    return rel.name.endswith(DATA_SUFFIXES) and not any(part.startswith(".") for part in rel.parts)


def scan_sources(data: str | Path) -> tuple[list[Source], list[str]]:
    """Expand a file, a directory (recursively) or a glob into sorted sources, plus the files skipped as non-data."""
    data = str(data)
    p = Path(data)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        named = [(f, f.relative_to(p)) for f in files]
    elif p.is_file():
        if not p.name.endswith(DATA_SUFFIXES):
            raise UserError(f"unsupported file type; expected one of {', '.join(DATA_SUFFIXES)}", file=data)
        return [Source(p, p.name)], []
    elif any(ch in data for ch in "*?["):
        named = [(Path(f), Path(Path(f).name)) for f in sorted(globlib.glob(data, recursive=True))
                 if Path(f).is_file()]
    else:
        raise UserError("no such file or directory", file=data)
    sources = [Source(f, rel.as_posix()) for f, rel in named if _is_data_file(rel)]
    skipped = [str(f) for f, rel in named if not _is_data_file(rel)]
    if not sources:
        seen = f"; found only {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}" if skipped else ""
        raise UserError(f"no data files found (expected {', '.join(DATA_SUFFIXES)}){seen}", file=data)
    return sources, skipped


def resolve_sources(data: str | Path) -> list[Source]:
    return scan_sources(data)[0]


def hash_sources(h, data: str | Path, split: str = DEFAULT_SPLIT, config: str | None = None):
    """Feed hashlib object `h` what identifies the rows of `data`: for files, every source's stable name and
    bytes; for a Hugging Face dataset, its stable key (see the module docstring), config and split."""
    kind = hf_kind(data, split, config)
    if kind:
        h.update(b"hf\0" + _hf_key(str(data), kind, split, config).encode())
        return
    for s in resolve_sources(data):
        h.update(s.name.encode() + b"\0")
        with open(s.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")


# ---------------------------------------------------------------- Hugging Face datasets

def _split_of(part: str) -> str | None:
    low = part.lower()
    for split, words in SPLIT_WORDS.items():
        for w in words:
            if low == w or (low.startswith(w) and low[len(w)] in "-._ 0123456789"):
                return split
    return None


def _names_several_splits(root: Path) -> bool:
    found = set()
    for f in root.rglob("*"):
        rel = f.relative_to(root)
        if f.is_file() and _is_data_file(rel):
            found |= {x for x in map(_split_of, rel.parts) if x}
    return len(found) > 1


def _readme_has_configs(root: Path) -> bool:
    readme = root / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    header = text[3:].split("\n---", 1)[0]
    return any(line.startswith("configs:") for line in header.splitlines())


def is_hub_id(text: str) -> bool:
    """`ORG/NAME` that is no local path and names no data file: a hub dataset id."""
    return not Path(text).expanduser().exists() and bool(HUB_ID.match(text)) and not text.endswith(DATA_SUFFIXES)


def hf_kind(data: str | Path, split: str = DEFAULT_SPLIT, config: str | None = None) -> str | None:
    """`"disk"` (save_to_disk), `"repo"` (repository folder), `"hub"` (hub id) or None (plain files)."""
    text = str(data)
    p = Path(text).expanduser()
    if p.is_dir():
        if any((p / m).is_file() for m in SAVE_TO_DISK_MARKERS):
            return "disk"
        if _readme_has_configs(p) or split != DEFAULT_SPLIT or config is not None or _names_several_splits(p):
            return "repo"
        return None
    if is_hub_id(text):
        return "hub"
    if (split != DEFAULT_SPLIT or config is not None) and (p.exists() or any(ch in text for ch in "*?[")):
        raise UserError(f"a split ({split!r}) or config ({config!r}) applies to Hugging Face datasets (a "
                        "save_to_disk directory, a dataset repository folder or a hub id), not to data files",
                        file=text)
    return None


def _unknown(what: str, name: Any, available, data: str) -> UserError:
    return UserError(f"unknown {what} {name!r}; available: {', '.join(map(str, available)) or 'none'}", file=data)


def _disk_split_dir(data: str, split: str, config: str | None) -> Path:
    root = Path(data).expanduser()
    if config is not None:
        raise UserError(f"a save_to_disk directory has no configs (got {config!r})", file=data)
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise _unknown("split", split, splits, data)
        return root / split
    recorded = json.loads((root / "state.json").read_text()).get("_split") or DEFAULT_SPLIT
    if split not in (DEFAULT_SPLIT, recorded):
        raise _unknown("split", split, [recorded], data)
    return root


def _hub_cache_dir() -> str:
    # Read at call time, not at import (huggingface_hub fixes its constant when first imported).
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = _hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        raise UserError(f"no such file or directory, and the Hugging Face dataset {repo_id!r} is not in the local "
                        f"cache ({cache}); fetch it with `hf download --repo-type dataset {repo_id}`", file=repo_id)
    except Exception as e:  # noqa: BLE001 - an incomplete snapshot and the like: the hub library says what
        raise UserError(f"cannot use the cached Hugging Face dataset: {' '.join(str(e).split())}", file=repo_id)


def _folder_hash(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(x for x in root.rglob("*") if x.is_file()):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _hf_key(data: str, kind: str, split: str, config: str | None) -> str:
    """The location-independent identity of one part of an HF dataset (row ids and `data_fingerprint`)."""
    if kind == "disk":
        state = json.loads((_disk_split_dir(data, split, config) / "state.json").read_text())
        base = f"disk:{state['_fingerprint']}"
    elif kind == "hub":
        base = f"hub:{data}@{_hub_snapshot(data).name}"
    else:
        base = f"repo:{_folder_hash(Path(data).expanduser())}"
    return f"{base}\x1f{config or ''}\x1f{split}"


def _load_folder(folder: Path, data: str, split: str, config: str | None):
    import datasets
    import pyarrow as pa

    configs = datasets.get_dataset_config_names(str(folder))
    if config is not None and config not in configs:
        raise _unknown("config", config, configs, data)
    try:
        builder = datasets.load_dataset_builder(str(folder), name=config,
                                                cache_dir=os.environ.get("HF_DATASETS_CACHE") or None)
    except ValueError as e:  # several configs and none chosen
        raise UserError(f"{' '.join(str(e).split())} (configs: {', '.join(configs)})", file=data)
    splits = list(builder.config.data_files or {})
    if split not in splits:
        raise _unknown("split", split, splits, data)
    try:
        builder.download_and_prepare()
    except (datasets.exceptions.DatasetGenerationError, pa.ArrowException) as e:  # the user's files are unreadable
        cause = e.__cause__ or e
        raise UserError(f"cannot build the dataset from its files ({' '.join(str(cause).split())[:300]})", file=data)
    return builder.as_dataset(split=split)


def hf_source(data: str, kind: str, split: str = DEFAULT_SPLIT, config: str | None = None) -> Source:
    """Open one part of a Hugging Face dataset as a `Source` read in Arrow batches."""
    if kind == "disk":
        import datasets
        table = datasets.load_from_disk(str(_disk_split_dir(data, split, config)))
    else:
        folder = _hub_snapshot(data) if kind == "hub" else Path(data).expanduser()
        table = _load_folder(folder, data, split, config)
    name = f"{data}:{config}:{split}" if config is not None else f"{data}:{split}"
    return Source(Path(data), name, key=_hf_key(data, kind, split, config), table=table)


def _iter_hf(source: Source, batch_rows: int, bad: OnBadRow) -> Iterator[list[tuple[int, dict]]]:
    n = 0
    for tbl in source.table.with_format("arrow").iter(batch_size=batch_rows):
        rows = tbl.to_pylist()
        yield [(n + i + 1, r) for i, r in enumerate(rows)]
        n += len(rows)


# ---------------------------------------------------------------- raw row reading

def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based line numbers; a damaged gzip stream is a `UserError` at its line."""
    n = 0
    with _open(path) as f:
        try:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    yield n, line.rstrip(b"\r\n")
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"the file cannot be read or decompressed from this line on ({e})", file=str(path),
                            row=n + 1)


def _parse_line(path: Path, n: int, b: bytes) -> dict:
    try:
        text = b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not valid UTF-8 (byte 0x{b[e.start]:02x} at byte {e.start + 1} of the line); "
                        "re-save the file as UTF-8", file=str(path), row=n)
    try:
        obj = json.loads(text.lstrip("\ufeff"))  # editors on Windows start files with a byte-order mark
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e.msg}, column {e.colno})", file=str(path), row=n)
    if not isinstance(obj, dict):
        raise UserError(f"expected a JSON object, got {type(obj).__name__}", file=str(path), row=n)
    return obj


def _iter_jsonl(path: Path, batch_rows: int, bad: OnBadRow) -> Iterator[list[tuple[int, dict]]]:
    batch: list[tuple[int, dict]] = []
    for n, line in _lines(path):
        try:
            batch.append((n, _parse_line(path, n, line)))
        except UserError as e:
            _bad_row(bad, e)
            continue
        if len(batch) >= batch_rows:
            yield batch
            batch = []
    if batch:
        yield batch


def _is_json_lines(path: Path) -> bool:
    """A `.json` file whose first non-blank line is a whole JSON object and which has more lines after it."""
    lines = _lines(path)
    try:
        for i, (_, line) in enumerate(lines):
            if i == 1:
                return True
            try:
                # Bad bytes are the line reader's to report, with the row; they do not change the shape.
                first = json.loads(line.decode("utf-8", "replace").lstrip("\ufeff"))
            except json.JSONDecodeError:
                return False
            if not isinstance(first, dict):
                return False
    except UserError:
        return False  # the whole-document reader reports the damage
    finally:
        lines.close()
    return False


def _iter_json(path: Path, batch_rows: int, bad: OnBadRow) -> Iterator[list[tuple[int, dict]]]:
    try:
        with _open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e.msg}, line {e.lineno} column {e.colno})", file=str(path))
    except UnicodeDecodeError as e:
        raise UserError(f"not valid UTF-8 ({e.reason} at byte {e.start + 1}); re-save the file as UTF-8",
                        file=str(path))
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read or decompress the file ({e})", file=str(path))
    if isinstance(doc, dict) and len(doc) == 1 and isinstance(next(iter(doc.values())), list):
        doc = next(iter(doc.values()))  # {"data": [...]} wrappers
    if not isinstance(doc, list):
        raise UserError("expected a JSON array of objects (or JSONL, one object per line)", file=str(path))
    for start in range(0, len(doc), batch_rows):
        chunk = []
        for i, obj in enumerate(doc[start:start + batch_rows], start=start + 1):
            if not isinstance(obj, dict):
                _bad_row(bad, UserError(f"expected a JSON object, got {type(obj).__name__}", file=str(path), row=i))
                continue
            chunk.append((i, obj))
        yield chunk


def _iter_parquet(path: Path, batch_rows: int, bad: OnBadRow) -> Iterator[list[tuple[int, dict]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"not a readable Parquet file ({e})", file=str(path))
    n = 0
    for batch in pf.iter_batches(batch_size=batch_rows):
        rows = batch.to_pylist()
        yield [(n + i + 1, r) for i, r in enumerate(rows)]
        n += len(rows)


def _bad_row(bad: OnBadRow, e: UserError):
    if bad is None:
        raise e
    bad(e)


def iter_raw(source: Source, batch_rows: int = 1024, bad: OnBadRow = None) -> Iterator[list[tuple[int, dict]]]:
    """Yield batches of `(row_number, dict)` from one file, failing with a `UserError` on an empty file.

    A row that is no JSON object (bad syntax, bad bytes, an array element that is no object) raises its
    `UserError`, or with `bad` is handed to it and left out, reading on. Damage that ends the file (a broken gzip
    stream, an unreadable Parquet file or JSON document) raises either way."""
    name = source.path.name
    if source.table is not None:
        reader = _iter_hf
    elif name.endswith(".parquet"):
        reader = _iter_parquet
    elif name.endswith((".json", ".json.gz")) and not _is_json_lines(source.path):
        reader = _iter_json
    else:
        reader = _iter_jsonl
    empty, seen_bad = True, [False]

    def report(e: UserError):
        seen_bad[0] = True
        bad(e)
    for batch in reader(source if source.table is not None else source.path, batch_rows, bad and report):
        if batch:
            empty = False
            yield batch
    if empty and not seen_bad[0]:
        raise UserError("file is empty (no rows)", file=source.where)


class BadRows:
    """The bad rows of one pass: the first `limit` errors kept, the rest counted (memory stays flat)."""

    def __init__(self, limit: int = MAX_BAD_ROWS):
        self.limit, self.shown, self.count, self.files = limit, [], 0, set()

    def add(self, e: UserError):
        self.count += 1
        if len(self.files) < 2:
            self.files.add(e.file)
        if len(self.shown) < self.limit:
            self.shown.append(e)

    def error(self, data: str) -> UserError | None:
        """None, the one bad row's own error, or one error listing them all (each with its file when they lie in
        several files)."""
        if self.count <= 1:
            return self.shown[0] if self.shown else None
        one = next(iter(self.files)) if len(self.files) == 1 else None
        listed = "; ".join(UserError(e.message, file=None if one else e.file, row=e.row, column=e.column).format()
                           for e in self.shown)
        rest = f"; and {self.count - len(self.shown)} more" if self.count > len(self.shown) else ""
        shown = f", the first {len(self.shown)} shown" if rest else ""
        what = "bad rows" if all(e.row is not None for e in self.shown) else "bad rows or files"
        return UserError(f"{self.count} {what} (every row is checked before any model is loaded{shown}): "
                         f"{listed}{rest}", file=one or data)
