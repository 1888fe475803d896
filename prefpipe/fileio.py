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


LOCK_FILE = ".prefpipe.lock"


class OutputLock:
    """An advisory lock on an output directory, held for the life of the command that writes there.

    Two commands writing one output would mix their files (one run's metrics.jsonl with another's final model), so
    the second is refused at once with a message naming the holder. The lock is `flock` on
    ``DIR/.prefpipe.lock``: the kernel releases it when its process dies, so a killed run never leaves a stale lock
    behind. Writers that legitimately share a directory (the `--shard i/n` processes of one precompute) take it
    `shared` and lock their own share exclusively under `name`.
    """

    def __init__(self, directory: str | Path, what: str, *, shared: bool = False, name: str = LOCK_FILE):
        self.path = Path(directory) / name
        self.what = what
        self.shared = shared
        self._fd = None

    def acquire(self) -> "OutputLock":
        import fcntl

        from prefpipe.errors import UserError

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.what} is in use by another prefpipe command ({holder}); wait for it to finish, "
                            "or choose another output", file=str(self.path.parent))
        if not self.shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
