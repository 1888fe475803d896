"""Atomic file writes: every file prefpipe writes for a user goes through here.

A write goes to a temporary name in the same directory (``.NAME.tmp-PID``), is flushed and fsynced, then renamed
over the destination. A killed run therefore leaves either the old file or the new one, never a half-written file
that looks complete. The PID in the temporary name lets a later run tell a dead writer's leftover from a live
writer's file.

A write that fails for a reason the user fixes (a full disk, a quota, a read-only filesystem, permissions:
`DISK_ERRNOS`) removes its temporary file and raises a `UserError` naming the file and what was kept, so the
command ends in one line and the output is left as it was before the write.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path

from prefpipe.errors import UserError

DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})


def temp_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_and_replace(tmp: Path, path: Path):
    """Make `tmp`'s bytes durable, then move it to `path` in one rename."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def disk_errno(exc: BaseException) -> int | None:
    """The `DISK_ERRNOS` code behind a failed write, or None. Libraries report it in different shapes: an OSError
    (Python, pyarrow), an OSError as the context of a RuntimeError (`torch.save` into a file object), or a Rust
    I/O error's "os error N" in the message (safetensors, tokenizers)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc.errno
        m = re.search(r"os error (\d+)", str(exc))
        if m and int(m.group(1)) in DISK_ERRNOS:
            return int(m.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def _remove(path: Path):
    import shutil

    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass  # cleanup must not hide the write's own error; a later run removes a dead writer's leftover


@contextmanager
def guarded_write(path: str | Path, kept: str | None = None, *, tmp: Path | None = None):
    """Run a write of `path` (through the temporary file or directory `tmp`, removed if the write fails). A disk
    problem becomes one `UserError` line: the file, the OS's reason, and `kept`, what the user still has (default:
    the file's previous version, or nothing)."""
    path = Path(path)
    had = path.exists()
    try:
        yield
    except BaseException as e:
        if tmp is not None:
            _remove(tmp)
        code = disk_errno(e) if isinstance(e, Exception) else None
        if code is None:
            raise
        if kept is None:
            kept = "its previous version is unchanged" if had else "nothing was left there"
        raise UserError(f"could not be written ({os.strerror(code)}); {kept}", file=str(path)) from e


def atomic_write_with(path: str | Path, write, kept: str | None = None):
    """Write `path` atomically with `write(tmp)`, a writer that takes a path (pyarrow, matplotlib)."""
    path = Path(path)
    tmp = temp_path(path)
    with guarded_write(path, kept, tmp=tmp):
        write(tmp)
        fsync_and_replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes, kept: str | None = None):
    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write_with(path, write, kept)


def atomic_write_text(path: str | Path, text: str, kept: str | None = None):
    atomic_write_bytes(path, text.encode("utf-8"), kept)


def append_whole(f, data: bytes):
    """Append `data` to the unbuffered binary file `f` (``open(p, "ab", buffering=0)``) whole or not at all: a
    write cut short (a full disk) is truncated away, so a line-oriented log never ends in half a line."""
    start = f.seek(0, os.SEEK_END)
    view = memoryview(data)
    try:
        while view:
            view = view[f.write(view):]
    except BaseException:
        try:
            os.ftruncate(f.fileno(), start)
        except OSError:
            pass
        raise


def remove_tree(path: str | Path):
    """Delete a directory tree; it is first renamed to a hidden name beside it, so that an interrupted delete
    leaves no half-deleted directory under the old name."""
    import shutil

    path = Path(path)
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash)


LOCK_FILE = ".prefpipe.lock"


_HELD: dict[Path, list] = {}  # lock file -> [fd, holders] for the locks this process holds


def is_lock_file(name: str) -> bool:
    """Whether a file name is one of the lock files OutputLock leaves in an output directory."""
    return name == LOCK_FILE or name.startswith(LOCK_FILE + ".")


def check_writable(directory: str | Path, what: str):
    """Refuse, in one line, an output directory that cannot be created or written, before any work starts.

    Leaves nothing behind: a probe file (or directory, where `directory` does not exist yet) is made in the
    directory or its nearest existing parent and removed again."""
    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise UserError(f"{what} exists and is not a directory", file=str(directory))
    parent = d
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} cannot be created: {parent} is a file, not a directory", file=str(directory))
    probe = parent / f".prefpipe-probe-{os.getpid()}"
    try:
        if parent == d:
            probe.open("w").close()
            probe.unlink()
        else:
            probe.mkdir()
            probe.rmdir()
    except OSError as e:
        raise UserError(f"{what} cannot be {'written' if parent == d else 'created'} ({e.strerror or e}: {parent})",
                        file=str(directory))


class OutputLock:
    """An advisory lock on an output directory, held for the life of the command that writes there.

    Two commands writing one output would mix their files (one run's metrics.jsonl with another's final model), so
    the second is refused at once with a message naming the holder. The lock is `flock` on
    ``DIR/.prefpipe.lock``: the kernel releases it when its process dies, so a killed run never leaves a stale lock
    behind. Writers that legitimately share a directory (the `--shard i/n` processes of one precompute) take it
    `shared` and lock their own share exclusively under `name`.

    Within one process the lock is re-entrant: the pipeline holds RUNS_DIR and the `run_training` it calls takes
    the same lock again, which is then a no-op (flock on a second descriptor would conflict with the first).
    """

    def __init__(self, directory: str | Path, what: str, *, shared: bool = False, name: str = LOCK_FILE):
        self.path = Path(directory) / name
        self.what = what
        self.shared = shared
        self._key = None

    def acquire(self) -> OutputLock:
        import fcntl

        key = self.path.absolute()
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return self
        check_writable(self.path.parent, self.what)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{self.what} cannot be written ({e.strerror or e})", file=str(self.path.parent))
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.what} is in use by another prefpipe command ({holder}); wait for it to finish, "
                            "or choose another output", file=str(self.path.parent))
        os.ftruncate(fd, 0)  # a shared holder overwrites another's note: either names a live holder
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}{', shared' if self.shared else ''}".encode())
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self):
        if self._key is None:
            return
        held = _HELD[self._key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self._key]
            os.close(held[0])  # closing drops the flock
        self._key = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
