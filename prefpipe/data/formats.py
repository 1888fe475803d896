"""Loading preference data from JSONL, JSON, Parquet, directories and globs.

Four shapes are detected from the column names and the type of the first readable row's values:

- ``paired``: ``prompt``, ``chosen``, ``rejected`` as strings;
- ``conversational``: ``prompt`` a list of ``{role, content}`` messages, ``chosen``/``rejected`` lists of
  assistant messages;
- ``implicit``: only ``chosen`` and ``rejected`` full transcripts (Anthropic HH style, strings or message
  lists); the prompt is their longest common prefix, cut at a turn boundary;
- ``unpaired`` (KTO): ``prompt``, ``completion``, ``label`` (bool).

Every row is validated against the detected shape; a bad row raises `UserError` naming file, row and column.
`Dataset.validate()` checks every row in one streaming pass before any compute and raises one `UserError` that
lists all bad rows (the first `MAX_BAD_ROWS`, and how many more); the commands that read data run it before they
load a model. Rows are numbered from 1 (for JSONL the row is the line number). Reading is batched, so memory does
not grow with the number of rows (a ``.json`` array file is the exception: it is one document and is parsed whole).

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

Shapes from the hub that need at most a column mapping:

- UltraFeedback-binarized: ``chosen``/``rejected`` full message lists (user turn, assistant turn) are
  ``implicit``; a ``prompt`` text column next to them (HuggingFaceH4's copy) is ignored, the prompt being the
  shared turns. Extra columns (``score_chosen``, ``messages``...) are ignored.
- HH-RLHF: ``chosen``/``rejected`` transcripts, ``implicit``.
- KTO message lists: ``prompt`` messages, ``completion`` ``[assistant message]``, ``label``: ``unpaired``.
- A system prompt column (Orca-DPO's ``system`` + ``question``): map ``Columns(prompt="question",
  system="system")``. With ``Columns.system`` set (it is unset by default, so a ``system`` column is otherwise
  ignored), plain-text rows become messages: prompt ``[system, user]`` (no system message where the value is
  null or empty), each response ``[assistant]``. They are then rendered with the tokenizer's chat template, as
  every conversational row is, since a system prompt has no meaning outside one. Message-list prompts carry
  their own system turn, so the column is an error there.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from prefpipe.errors import UserError
from prefpipe.options import opt
from prefpipe.wording import did_you_mean

FORMATS = ("paired", "conversational", "implicit", "unpaired")
# How many bad rows one error lists (the rest are counted): enough to show a pattern, short enough to read.
MAX_BAD_ROWS = 20
TEXT_SUFFIXES = (".jsonl", ".ndjson", ".json")
DATA_SUFFIXES = (*TEXT_SUFFIXES, *(x + ".gz" for x in TEXT_SUFFIXES), ".parquet")
ROLES = ("system", "user", "assistant", "tool", "developer")
# HH transcripts: the prompt ends right after the last assistant marker that both transcripts share.
DEFAULT_TURN_MARKER = "\n\nAssistant:"
DEFAULT_SPLIT = "train"
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# The split names the hub's file-name convention recognises (a path part that is the word or starts with it
# followed by a separator or a digit), grouped by the split they mean.
SPLIT_WORDS = {"train": ("train", "training"), "test": ("test", "testing", "eval", "evaluation"),
               "validation": ("validation", "valid", "val", "dev")}


OnBadRow = Callable[[UserError], None] | None


@dataclass(frozen=True)
class Columns:
    """Column names in the input; each maps to a CLI override (`--prompt_col`, ...)."""
    prompt: str = opt("prompt", name="prompt_col", help="Column holding the prompt.")
    chosen: str = opt("chosen", name="chosen_col", help="Column holding the chosen response.")
    rejected: str = opt("rejected", name="rejected_col", help="Column holding the rejected response.")
    completion: str = opt("completion", name="completion_col", help="Unpaired (KTO) data: column holding the completion.")
    label: str = opt("label", name="label_col", help="Unpaired (KTO) data: boolean column, true = desirable.")
    system: str | None = opt(None, name="system_col", default_text="unset",
                             help="Plain-text data: a column holding a system message; the prompt becomes "
                                  "[system, user] messages rendered with the chat template.")


@dataclass
class Record:
    """One validated input row, normalised to the four shapes' common fields."""
    row_id: str
    source: str
    row: int
    prompt: Any  # str or list of messages
    chosen: Any = None
    rejected: Any = None
    completion: Any = None
    label: bool | None = None
    content_hash: str = ""
    # Token ids the row brings ({"prompt": [...], "chosen": [...], ...}): a generate output's sampled ids, used
    # as they are instead of tokenizing the texts (prefpipe.data.generated).
    ids: dict | None = None
    extra: dict | None = None  # prompt-only rows: the row's other columns, for a judge


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


def _columns_key(columns: Columns) -> dict:
    # An unset system column is left out so fingerprints made before it existed still match.
    return {k: v for k, v in columns.__dict__.items() if not (k == "system" and v is None)}


def data_fingerprint(data: str | Path, columns: Columns = Columns(), split: str = DEFAULT_SPLIT,
                     config: str | None = None) -> str:
    """sha256 over the column mapping and, for files, every source's stable name and bytes; for a Hugging Face
    dataset, over its stable key (see the module docstring), config and split."""
    h = hashlib.sha256()
    h.update(json.dumps(_columns_key(columns), sort_keys=True).encode())
    kind = hf_kind(data, split, config)
    if kind:
        h.update(b"hf\0" + _hf_key(str(data), kind, split, config).encode())
        return h.hexdigest()
    for s in resolve_sources(data):
        h.update(s.name.encode() + b"\0")
        with open(s.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


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


# ---------------------------------------------------------------- detection and validation

def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) for m in v) and len(v) > 0


def _is_transcript(v: Any) -> bool:
    """A message list that starts before the assistant's turn: the prompt is inside it."""
    return _is_messages(v) and v[0].get("role") != "assistant"


def detect_format(row: dict, columns: Columns, file: str, row_number: int = 1) -> str:
    """Pick one of `FORMATS` from the first readable row's keys and value types (`row_number` names it)."""
    keys = set(k for k, v in row.items() if v is not None) | set(row)
    c = columns
    if c.completion in keys and c.label in keys:
        return "unpaired"
    if c.chosen in keys and c.rejected in keys:
        if c.prompt not in keys or row.get(c.prompt) is None or _is_transcript(row.get(c.chosen)):
            return "implicit"
        return "conversational" if isinstance(row.get(c.prompt), list) else "paired"
    missing = [k for k in (c.prompt, c.chosen, c.rejected) if k not in keys]
    found = ", ".join(repr(k) for k in list(row)[:20]) + (" ..." if len(row) > 20 else "") if row else "none"
    raise UserError(
        "cannot detect the format: expected prompt/chosen/rejected (paired), chosen/rejected (implicit prompt) "
        f"or prompt/completion/label (unpaired); missing {', '.join(repr(m) + did_you_mean(m, row) for m in missing)}; "
        f"found {found}. "
        "Use --prompt_col/--chosen_col/--rejected_col/--completion_col/--label_col to map other names",
        file=file, row=row_number, column=missing[0])


def _check_text(v: Any, file: str, row: int, col: str) -> str:
    if v is None:
        raise UserError("missing value (column absent or null)", file=file, row=row, column=col)
    if not isinstance(v, str):
        raise UserError(f"expected text, got {type(v).__name__} {json.dumps(v, default=str)[:40]}",
                        file=file, row=row, column=col)
    return v


def _check_messages(v: Any, file: str, row: int, col: str, *, responses: bool) -> list[dict]:
    if v is None:
        raise UserError("missing value (column absent or null)", file=file, row=row, column=col)
    if not isinstance(v, list):
        raise UserError(f"expected a list of {{role, content}} messages, got {type(v).__name__}",
                        file=file, row=row, column=col)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"message {i} is not a {{role, content}} object", file=file, row=row, column=col)
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise UserError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})",
                            file=file, row=row, column=col)
        if responses and role != "assistant":
            raise UserError(f"message {i} has role {role!r}; responses must be assistant messages",
                            file=file, row=row, column=col)
        if not isinstance(content, str):
            raise UserError(f"message {i} content must be text, got {type(content).__name__}",
                            file=file, row=row, column=col)
        out.append({"role": role, "content": content})
    return out


def _check_response(v: Any, conversational: bool, file: str, row: int, col: str):
    return _check_messages(v, file, row, col, responses=True) if conversational else _check_text(v, file, row, col)


def split_implicit(chosen: Any, rejected: Any, file: str, row: int, columns: Columns,
                   turn_marker: str = DEFAULT_TURN_MARKER):
    """Split two full transcripts into (prompt, chosen_response, rejected_response).

    Strings: the prompt is the longest common prefix cut just after the last `turn_marker` inside it.
    Message lists: the prompt is the longest common run of whole messages; the rest must be assistant turns.
    """
    if isinstance(chosen, list) or isinstance(rejected, list):
        c = _check_messages(chosen, file, row, columns.chosen, responses=False)
        r = _check_messages(rejected, file, row, columns.rejected, responses=False)
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        # The shared run must end where a response begins: step back over shared assistant turns.
        while n > 0 and c[n - 1]["role"] == "assistant":
            n -= 1
        if n == 0:
            raise UserError("the two transcripts share no prompt turns", file=file, row=row, column=columns.chosen)
        for col, rest in ((columns.chosen, c[n:]), (columns.rejected, r[n:])):
            if rest and rest[0]["role"] != "assistant":
                raise UserError("the transcripts differ before an assistant turn", file=file, row=row, column=col)
        return c[:n], c[n:], r[n:]
    c = _check_text(chosen, file, row, columns.chosen)
    r = _check_text(rejected, file, row, columns.rejected)
    n = 0
    limit = min(len(c), len(r))
    while n < limit and c[n] == r[n]:
        n += 1
    cut = c.rfind(turn_marker, 0, n)
    if cut < 0 or cut + len(turn_marker) > n:
        raise UserError(f"no shared turn marker {turn_marker!r} to split the prompt from the responses",
                        file=file, row=row, column=columns.chosen)
    cut += len(turn_marker)
    return c[:cut], c[cut:], r[cut:]


def _with_system(fmt: str, raw: dict, prompt: Any, responses: list, file: str, row: int, col: str):
    """Plain text plus a system column -> messages (module docstring); transcripts and message lists are refused."""
    if isinstance(prompt, list) or fmt not in ("paired", "unpaired"):
        raise UserError(f"a system column applies to plain-text prompt/response data, not to {fmt} data (message "
                        "lists carry their own system message)", file=file, row=row, column=col)
    system = raw.get(col)
    if system is not None and not isinstance(system, str):
        raise UserError(f"expected text, got {type(system).__name__}", file=file, row=row, column=col)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return msgs, [[{"role": "assistant", "content": r}] for r in responses]


def _row_content(fmt: str, raw: dict, file: str, row: int, columns: Columns, turn_marker: str) -> dict:
    """One row checked against the shape `fmt` and normalised: what its record holds (and its hashes cover)."""
    c = columns
    if fmt == "unpaired":
        prompt = raw.get(c.prompt)
        conv = isinstance(prompt, list)
        prompt = _check_messages(prompt, file, row, c.prompt, responses=False) if conv else \
            _check_text(prompt, file, row, c.prompt)
        completion = _check_response(raw.get(c.completion), conv, file, row, c.completion)
        if c.system:
            prompt, (completion,) = _with_system(fmt, raw, prompt, [completion], file, row, c.system)
        label = raw.get(c.label)
        if not isinstance(label, bool):
            raise UserError(f"label must be a boolean (true = desirable), got {json.dumps(label, default=str)}",
                            file=file, row=row, column=c.label)
        return {"prompt": prompt, "completion": completion, "label": label}
    if fmt == "implicit":
        prompt, chosen, rejected = split_implicit(raw.get(c.chosen), raw.get(c.rejected), file, row, c, turn_marker)
    elif fmt == "conversational":
        prompt = _check_messages(raw.get(c.prompt), file, row, c.prompt, responses=False)
        chosen = _check_response(raw.get(c.chosen), True, file, row, c.chosen)
        rejected = _check_response(raw.get(c.rejected), True, file, row, c.rejected)
    else:
        prompt = raw.get(c.prompt)
        if isinstance(prompt, list):
            raise UserError("prompt is a message list but the file was detected as plain-text paired data "
                            "(from its first row)", file=file, row=row, column=c.prompt)
        prompt = _check_text(prompt, file, row, c.prompt)
        chosen = _check_text(raw.get(c.chosen), file, row, c.chosen)
        rejected = _check_text(raw.get(c.rejected), file, row, c.rejected)
    if c.system:
        prompt, (chosen, rejected) = _with_system(fmt, raw, prompt, [chosen, rejected], file, row, c.system)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _make_record(fmt: str, raw: dict, source: Source, row: int, columns: Columns, turn_marker: str) -> Record:
    content = _row_content(fmt, raw, source.where, row, columns, turn_marker)
    rec = Record("", source.name, row, **content)
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False)
    rec.content_hash = hashlib.sha256(blob.encode()).hexdigest()[:16]
    # Source name + row number + content: unique even for duplicate rows, and stable across runs and machines.
    rec.row_id = hashlib.sha256(f"{source.key}\x1f{row}\x1f{blob}".encode()).hexdigest()[:16]
    return rec


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


@dataclass
class Dataset:
    """A lazily read preference dataset. Iterate `batches()` to get validated `Record` lists; `validate()` first
    checks every row in one streaming pass and reports all bad rows at once.

    `split` and `config` choose the part of a Hugging Face dataset (module docstring); files have neither."""
    data: str
    columns: Columns = field(default_factory=Columns)
    turn_marker: str = DEFAULT_TURN_MARKER
    batch_rows: int = 1024
    split: str = DEFAULT_SPLIT
    config: str | None = None

    def __post_init__(self):
        self.hf_kind = hf_kind(self.data, self.split, self.config)
        if self.hf_kind:
            self.sources, self.skipped_files = [hf_source(str(self.data), self.hf_kind, self.split, self.config)], []
        else:
            self.sources, self.skipped_files = scan_sources(self.data)
        self.row_counts: list[int] | None = None  # rows per source, once `validate()` has counted them
        row, first = self._first_row()
        self.format = detect_format(first, self.columns, self.sources[0].where, row)
        if self.columns.system and self.columns.system not in first:
            raise UserError(f"no system column {self.columns.system!r} (found {', '.join(map(repr, first))})",
                            file=self.sources[0].where, row=row, column=self.columns.system)

    def _first_row(self) -> tuple[int, dict]:
        """The first source's first readable row: the format is detected from it. Unreadable rows before it are
        the validation pass's to report (with every other bad row); a source with none is reported here."""
        bad = BadRows()
        for batch in iter_raw(self.sources[0], batch_rows=1, bad=bad.add):
            return batch[0]
        raise bad.error(self.sources[0].where)

    @property
    def paired(self) -> bool:
        return self.format != "unpaired"

    def batches(self) -> Iterator[list[Record]]:
        for source in self.sources:
            for raw in iter_raw(source, self.batch_rows):
                yield [_make_record(self.format, r, source, n, self.columns, self.turn_marker) for n, r in raw]

    def validate(self, limit: int = MAX_BAD_ROWS) -> Dataset:
        """Read every row once, streaming, and check it as `batches()` would (syntax, shape, types); raise one
        `UserError` listing the bad rows (the first `limit`, and how many more), or count the rows per source
        (`row_counts`, which the precompute progress bar totals) and return the dataset. A file that cannot be
        read on is one entry, and the pass goes on with the next file."""
        bad = BadRows(limit)
        counts = []
        for source in self.sources:
            n = 0
            try:
                for raw in iter_raw(source, self.batch_rows, bad=bad.add):
                    n += len(raw)
                    for row, r in raw:
                        try:
                            _row_content(self.format, r, source.where, row, self.columns, self.turn_marker)
                        except UserError as e:
                            bad.add(e)
            except UserError as e:
                bad.add(e)
            counts.append(n)
        error = bad.error(str(self.data))
        if error is not None:
            raise error
        self.row_counts = counts
        return self

    def fingerprint(self) -> str:
        return data_fingerprint(self.data, self.columns, self.split, self.config)
