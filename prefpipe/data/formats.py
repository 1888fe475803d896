"""The shapes of preference data: detecting one, checking every row against it, and the `Record` each row becomes.

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
load a model. Which files and Hugging Face datasets are read, and how, is `prefpipe.data.sources`'s docstring.

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

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from prefpipe.data import generated
from prefpipe.data.sources import (
    DEFAULT_SPLIT, MAX_BAD_ROWS, BadRows, Source, hash_sources, hf_kind, hf_source, iter_raw, scan_sources,
)
from prefpipe.errors import UserError
from prefpipe.options import opt
from prefpipe.wording import did_you_mean

FORMATS = ("paired", "conversational", "implicit", "unpaired")
ROLES = ("system", "user", "assistant", "tool", "developer")
# HH transcripts: the prompt ends right after the last assistant marker that both transcripts share.
DEFAULT_TURN_MARKER = "\n\nAssistant:"


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


def _columns_key(columns: Columns) -> dict:
    # An unset system column is left out so fingerprints made before it existed still match.
    return {k: v for k, v in columns.__dict__.items() if not (k == "system" and v is None)}


def data_fingerprint(data: str | Path, columns: Columns = Columns(), split: str = DEFAULT_SPLIT,
                     config: str | None = None, kto_view: bool = False) -> str:
    """sha256 over the column mapping, then what identifies the rows (`prefpipe.data.sources.hash_sources`: for
    files, every source's stable name and bytes; for a Hugging Face dataset, its stable key, config and split).
    A generate output's is its run key and the bytes of the view read (`prefpipe.data.generated.fingerprint`)."""
    if generated.is_generate_output(data):
        return generated.fingerprint(data, kto_view)
    h = hashlib.sha256()
    h.update(json.dumps(_columns_key(columns), sort_keys=True).encode())
    hash_sources(h, data, split, config)
    return h.hexdigest()


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
    if fmt == "prompts":
        prompt = raw.get(c.prompt)
        prompt = _check_messages(prompt, file, row, c.prompt, responses=False) if isinstance(prompt, list) else \
            _check_text(prompt, file, row, c.prompt)
        if c.system and isinstance(prompt, str):
            prompt, _ = _with_system("paired", raw, prompt, [], file, row, c.system)
        return {"prompt": prompt}
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
    if fmt == "prompts":
        rec.extra = raw
    return rec


# Validations passed in this process: key (`Dataset._validation_key`) -> rows per source.
_VALIDATED: dict[tuple, tuple] = {}


@dataclass
class Dataset:
    """A lazily read preference dataset. Iterate `batches()` to get validated `Record` lists; `validate()` first
    checks every row in one streaming pass and reports all bad rows at once.

    `split` and `config` choose the part of a Hugging Face dataset (module docstring); files have neither. A
    `prefpipe generate` output reads as its pairs, or with `kto_view` as its KTO view (prefpipe.data.generated);
    `prompts_only` reads rows that need only a prompt (generation's input), keeping their other columns."""
    data: str
    columns: Columns = field(default_factory=Columns)
    turn_marker: str = DEFAULT_TURN_MARKER
    batch_rows: int = 1024
    split: str = DEFAULT_SPLIT
    config: str | None = None
    kto_view: bool = False
    prompts_only: bool = False

    def __post_init__(self):
        self.generated = generated.is_generate_output(self.data) and not self.prompts_only
        self.row_counts: list[int] | None = None  # rows per source, once `validate()` has counted them
        if self.generated:
            generated.read_manifest(self.data)  # refuses an output being written or never finished
            self.hf_kind, self.sources, self.skipped_files = None, [], []
            self.format = "unpaired" if self.kto_view else "paired"
            return
        self.hf_kind = hf_kind(self.data, self.split, self.config)
        if self.hf_kind:
            self.sources, self.skipped_files = [hf_source(str(self.data), self.hf_kind, self.split, self.config)], []
        else:
            self.sources, self.skipped_files = scan_sources(self.data)
        row, first = self._first_row()
        self.format = "prompts" if self.prompts_only else detect_format(first, self.columns, self.sources[0].where,
                                                                        row)
        if self.prompts_only and self.columns.prompt not in first:
            raise UserError(f"no prompt column {self.columns.prompt!r} (found {', '.join(map(repr, first))}); "
                            "use --prompt_col to name it", file=self.sources[0].where, row=row,
                            column=self.columns.prompt)
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
        if self.generated:
            for raw in generated.rows(self.data, self.kto_view, self.batch_rows):
                yield [Record(source=str(generated.view_file(self.data, self.kto_view)), row=n, **r) for n, r in raw]
            return
        for source in self.sources:
            for raw in iter_raw(source, self.batch_rows):
                yield [_make_record(self.format, r, source, n, self.columns, self.turn_marker) for n, r in raw]

    def validate(self, limit: int = MAX_BAD_ROWS) -> Dataset:
        """Read every row once, streaming, and check it as `batches()` would (syntax, shape, types); raise one
        `UserError` listing the bad rows (the first `limit`, and how many more), or count the rows per source
        (`row_counts`, which the precompute progress bar totals) and return the dataset. A file that cannot be
        read on is one entry, and the pass goes on with the next file. A generate output was checked as it was
        written: its rows are counted."""
        if self.generated:
            self.row_counts = [generated.row_count(self.data, self.kto_view)]
            return self
        memo = self._validation_key()
        if memo is not None and memo in _VALIDATED:
            self.row_counts = list(_VALIDATED[memo])
            return self
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
        if memo is not None:
            _VALIDATED[memo] = tuple(counts)
        return self

    def _validation_key(self):
        """What a passed validation of these files depends on (each file's path, size and modification time, and
        how rows are read), so that a pipeline's up-front check and its precompute read a file once; None for a
        Hugging Face dataset, which is not memoised."""
        if self.hf_kind:
            return None
        try:
            stats = tuple((str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns)
                          for s in self.sources)
        except OSError:
            return None
        return stats, self.format, json.dumps(_columns_key(self.columns), sort_keys=True), self.turn_marker

    def fingerprint(self) -> str:
        return data_fingerprint(self.data, self.columns, self.split, self.config, self.kto_view)

    def check_tokenizer(self, tokenizer) -> None:
        """A generate output's ids are its generator's tokenizer's: any other tokenizer is refused."""
        if self.generated:
            generated.check_tokenizer(self.data, tokenizer)
