"""Reading a `prefpipe generate` output directory as a dataset (the file layout is declared here, once).

A generate output holds ``samples/part-*.parquet`` (every judged sample), ``pairs.parquet`` (the pairs built from
them), ``kto.parquet`` (the KTO view) and ``manifest.json``, written last, with ``"kind": "prefpipe-generate"``.
Read as data, it gives its pairs (or, with the KTO view, its labelled completions) as records that carry their
token ids: the prompt ids sampled from and the completion ids sampled. The tokenizer then uses those ids as they are
(prefpipe.data.tokenize), because decoding a sample and encoding the text again can give other ids, and the cache
must score the sequence the model produced. Those ids belong to the generator's tokenizer, so reading them with any
other tokenizer is refused (`check_tokenizer`).

A directory without its manifest is incomplete (a generate command is still writing it, or was stopped), and one
whose lock a generate command holds is being written: both are refused rather than read half-way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from prefpipe.data.fingerprint import tokenizer_diff, tokenizer_fingerprint
from prefpipe.errors import UserError
from prefpipe.fileio import LOCK_FILE

KIND = "prefpipe-generate"
MANIFEST = "manifest.json"
SAMPLES_DIR = "samples"
PAIRS_FILE = "pairs.parquet"
KTO_FILE = "kto.parquet"
PAIR_COLUMNS = ("prompt_index", "row_id", "prompt", "chosen", "rejected", "prompt_ids", "chosen_ids",
                "rejected_ids", "chosen_reward", "rejected_reward", "chosen_finish", "rejected_finish")
KTO_COLUMNS = ("prompt_index", "row_id", "prompt", "completion", "label", "prompt_ids", "completion_ids",
               "reward", "finish_reason")


def is_generate_output(data) -> bool:
    """True for a directory that a generate command writes or wrote (its manifest, or its samples folder)."""
    try:
        d = Path(data)
        return d.is_dir() and ((d / SAMPLES_DIR).is_dir() or _manifest_kind(d / MANIFEST) == KIND)
    except (OSError, ValueError):
        return False


def _manifest_kind(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _being_written(d: Path) -> str | None:
    """The lock holder's note while a generate command holds DIR's lock, else None."""
    import fcntl
    import os

    try:
        fd = os.open(d / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


def read_manifest(data) -> dict:
    """The finished output's manifest; an output being written, or never finished, is refused in one line."""
    d = Path(data)
    holder = _being_written(d)
    if holder:
        raise UserError(f"this generate output is being written by another command ({holder}); read it once that "
                        "command has finished", file=str(d))
    if _manifest_kind(d / MANIFEST) != KIND:
        raise UserError("this generate output is incomplete (no manifest.json: its generate command was stopped "
                        "before the end); rerun that command, which resumes from its finished parts", file=str(d))
    return json.loads((d / MANIFEST).read_text())


def view_file(data, kto_view: bool) -> Path:
    return Path(data) / (KTO_FILE if kto_view else PAIRS_FILE)


def fingerprint(data, kto_view: bool) -> str:
    """sha256 over the manifest's run key and the bytes of the view read."""
    h = hashlib.sha256(read_manifest(data)["key"].encode() + b"\0")
    with open(view_file(data, kto_view), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_tokenizer(data, tokenizer) -> None:
    """Refuse a tokenizer other than the generator's: the stored ids are that tokenizer's ids."""
    expected = read_manifest(data)["generator"]["tokenizer"]
    actual = tokenizer_fingerprint(tokenizer)
    if actual["fingerprint"] != expected["fingerprint"]:
        differ = ", ".join(tokenizer_diff(expected, actual)) or "fingerprint"
        raise UserError(f"this generate output holds the token ids of its generator's tokenizer, and this "
                        f"tokenizer differs ({differ}); precompute and train with the generator's tokenizer",
                        file=str(data))


def rows(data, kto_view: bool, batch_rows: int = 1024) -> Iterator[list[tuple[int, dict]]]:
    """The view's rows, numbered from 1, with the prompt decoded and their ids under "ids" (Record's fields)."""
    import pyarrow.parquet as pq

    n = 0
    fields = ("completion",) if kto_view else ("chosen", "rejected")
    for batch in pq.ParquetFile(view_file(data, kto_view)).iter_batches(batch_size=batch_rows):
        out = []
        for r in batch.to_pylist():
            n += 1
            ids = {"prompt": r["prompt_ids"], **{f: r[f"{f}_ids"] for f in fields}}
            row = {"row_id": r["row_id"], "prompt": json.loads(r["prompt"]), "ids": ids,
                   "content_hash": hashlib.sha256(json.dumps(ids, sort_keys=True).encode()).hexdigest()[:16],
                   **{f: r[f] for f in fields}}
            if kto_view:
                row["label"] = bool(r["label"])
            out.append((n, row))
        yield out


def row_count(data, kto_view: bool) -> int:
    import pyarrow.parquet as pq
    return pq.ParquetFile(view_file(data, kto_view)).metadata.num_rows
