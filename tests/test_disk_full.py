"""A write that fails for a reason the user fixes (full disk, quota, read-only filesystem, permissions) ends the
command in one line naming the file and what was kept; nothing half-written stays, and the run continues after
space is freed. Where the test runs as root, the disk is a real, tiny tmpfs; elsewhere those tests are skipped and
the ones below them inject the OS error."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess

import pytest
import torch

from helpers import make_pairs, one_line_error, write_jsonl
from prefpipe.data.cache import MANIFEST, read_cache
from prefpipe.errors import UserError
from prefpipe import fileio


@pytest.fixture
def tiny_disk(tmp_path):
    """`mount(size_kib)` mounts a tmpfs of that size at a fresh directory and returns it; `grow` remounts it
    larger ("space is freed"). Skips where mounting is not allowed."""
    mounted = []

    def mount(size_kib: int):
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(d)],
                           capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(d)
        return d

    def grow(d, size_kib: int):
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(d)], check=True)

    mount.grow = grow
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def error_line(result, *needles) -> str:
    """The command failed with exit 2 and its stderr ends in one `prefpipe: error:` line holding every needle (the
    lines before it are the run's own log and progress bar); no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr, result.stderr
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("prefpipe: error: "), result.stderr
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def leftovers(d) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if ".tmp" in p.name)


def test_precompute_on_a_full_disk_keeps_whole_parts_and_resumes(tiny_model, tmp_path, tiny_disk, run_cli):
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(40, seed=2))
    args = ["precompute", "--model", tiny_model, "--data", data, "--part_rows", "4", "--max_length", "64",
            "--max_prompt_length", "24", "--dtype", "float32", "--device", "cpu"]
    ok = run_cli(*args, "--out", tmp_path / "roomy", "--no_progress")
    assert ok.exit_code == 0, ok.output
    part_pages = max(-(-p.stat().st_size // 4096) for p in (tmp_path / "roomy").glob("part-*.parquet"))
    disk = tiny_disk(4 * (1 + 3 * part_pages))  # the lock file and about three parts
    out = disk / "cache"

    r = run_cli(*args, "--out", out)  # the default progress bar on
    err = error_line(r, "file " + str(out / "part-0000"), "No space left on device",
                         "finished parts are kept", "rerun the same command")
    assert ".parquet:" in err
    kept = sorted(p.name for p in out.glob("part-*.parquet"))
    assert 1 <= len(kept) < 10 and not (out / MANIFEST).exists() and leftovers(out) == []

    tiny_disk.grow(disk, 4096)
    again = run_cli(*args, "--out", out, "--no_progress")
    assert again.exit_code == 0, again.output
    assert f"{10 - len(kept)} written now, {len(kept)} reused" in again.output
    assert read_cache(out).table.equals(read_cache(tmp_path / "roomy").table)


def test_train_on_a_full_disk_says_what_is_kept(tiny_model, tmp_path, tiny_disk, run_cli):
    """The model (536 kB of safetensors, written by Rust) does not fit: the error names final/ and --resume."""
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(8, seed=2))
    cache = tmp_path / "cache"
    assert run_cli("precompute", "--model", tiny_model, "--data", data, "--out", cache, "--max_length", "64",
                   "--max_prompt_length", "24", "--no_progress", "--device", "cpu").exit_code == 0
    disk = tiny_disk(256)
    r = run_cli("train", "--model", tiny_model, "--cache", cache, "--out", disk / "runs", "--max_steps", "2",
                "--batch_size", "4", "--device", "cpu")
    err = error_line(r, "final", "No space left on device", "--resume")
    assert "saved checkpoints are kept" in err
    assert leftovers(disk) == [] and not any(disk.rglob("final"))
    metrics = [p for p in disk.rglob("metrics.jsonl")]
    assert metrics and all(json.loads(line) for line in metrics[0].read_text().splitlines())


def test_inspect_with_a_full_tmpdir_names_it(tiny_model, tmp_path, tiny_disk, run_cli, monkeypatch):
    import tempfile
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(30, seed=2))
    cache = tmp_path / "cache"
    assert run_cli("precompute", "--model", tiny_model, "--data", data, "--out", cache, "--max_length", "64",
                   "--max_prompt_length", "24", "--no_progress", "--device", "cpu").exit_code == 0
    disk = tiny_disk(4)
    monkeypatch.setattr(tempfile, "tempdir", str(disk))
    one_line_error(run_cli("inspect", cache), f"file {disk}/prefpipe-cache-", "No space left on device", "TMPDIR")
    assert list(disk.iterdir()) == []


# ---------------------------------------------------------------- injected errors (no root needed)

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch, code):
    target = tmp_path / "pipeline.json"
    target.write_text("old")

    def fail(fd):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(UserError) as e:
        fileio.atomic_write_text(target, "new")
    assert str(e.value) == (f"file {target}: could not be written ({os.strerror(code)}); its previous version is "
                            "unchanged")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.json"]


def test_other_os_errors_are_not_disguised(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError) as e:
        fileio.atomic_write_text(tmp_path / "x.json", "new")
    assert not isinstance(e.value, UserError) and list(tmp_path.iterdir()) == []


class FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, room: int):
        self.room, self.data = room, b""

    def writable(self):
        return True

    def write(self, b):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = min(len(b), self.room)
        self.data += bytes(b[:n])
        self.room -= n
        return n


def test_the_disk_error_behind_torch_and_rust_writers_is_found():
    with pytest.raises(RuntimeError) as e:  # torch.save reports it as an unhelpful RuntimeError ...
        torch.save({"w": torch.zeros(10000)}, FullDisk(1000))
    assert "No space" not in str(e.value)
    assert fileio.disk_errno(e.value) == errno.ENOSPC  # ... whose context holds the OSError
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors
    assert fileio.disk_errno(rust) == errno.ENOSPC
    assert fileio.disk_errno(RuntimeError("unexpected pos 576 vs 534")) is None


def test_an_append_cut_short_is_undone(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 1}\n')

    class Cut(FullDisk):
        def __init__(self, f):
            super().__init__(5)
            self.f = f

        def write(self, b):
            n = super().write(b)
            return self.f.write(bytes(b[:n]))

        def seek(self, *a):
            return self.f.seek(*a)

        def fileno(self):
            return self.f.fileno()

    with open(log, "ab", buffering=0) as f, pytest.raises(OSError):
        fileio.append_whole(Cut(f), b'{"step": 2, "loss": 0.69}\n')
    assert log.read_bytes() == b'{"step": 1}\n'
