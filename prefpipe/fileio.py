"""Atomic file writes: every file prefpipe writes for a user goes through here.

A write goes to a temporary name in the same directory (``.NAME.tmp-PID``), is flushed and fsynced, then renamed
over the destination. A killed run therefore leaves either the old file or the new one, never a half-written file
that looks complete. The PID in the temporary name lets a later run tell a dead writer's leftover from a live
writer's file.
"""

from __future__ import annotations

import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_and_replace(tmp: Path, path: Path):
    """Make `tmp`'s bytes durable, then move it to `path` in one rename."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes):
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))
