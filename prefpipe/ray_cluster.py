"""What `precompute --engine ray` and `generate --engine ray` share: joining or starting Ray, the GPUs an actor
asks for, running a Ray Data plan of parts and turning its failures into one line that names the part.

A plan's last stage is a pool of actors that each handle one part per call and answer one row per part:
`{"index": part, "blob": pickle of (ok, value)}`. A stage catches its own errors and answers `(False, one line)`,
so an ordinary failure names its part. An actor *process* that dies takes no such care: Ray restarts it and retries
its call (`RESTARTS` times), and when it gives up the error names only the dead process. So each actor tells the
`Ledger` which part it starts before it starts it, and the driver asks the ledger which part that process held.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import socket
from pathlib import Path

from prefpipe.errors import UserError

INSTALL_HINT = "install it with `pip install 'prefpipe[ray]'`"
RESTARTS = 3  # per actor: Ray restarts a dead actor and retries its part this many times


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the engines plan with Ray Data: a Ray without it is not enough
    except ImportError as e:
        if e.name and e.name.split(".")[0] == "ray":
            raise UserError(f"--engine ray needs Ray Data, which is not installed here; {INSTALL_HINT}")
        raise UserError(f"Ray is installed but cannot be imported ({e}); {INSTALL_HINT}")
    return ray


def check_out(cfg):
    if cfg.ray_address and not Path(cfg.out).is_absolute():
        raise UserError("--out must be an absolute path when joining a Ray cluster (--ray_address): every "
                        "node writes its parts there, so it must be a directory all nodes see", file=str(cfg.out))


def connect(ray, cfg) -> bool:
    """Join `--ray_address`, or start a local instance; True when this call did (the caller shuts it down).
    A process that already called `ray.init` (a notebook, the tests) is used as it is."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}  # not even the token-auth notice
    if cfg.ray_address:
        try:
            ray.init(address=cfg.ray_address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--ray_address {cfg.ray_address}: cannot join the Ray cluster ({one_line(e)})")
        return True
    # Logical CPUs for every stage even on a small machine: a reader, the tokenizers and one per actor.
    ray.init(num_cpus=max(os.cpu_count() or 1, 2 * cfg.ray_workers + 2), include_dashboard=False, **quiet)
    return True


def quiet_data(ray):
    """Ray Data's own progress bars and execution logs off: the command draws one bar of its own."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray").setLevel(logging.ERROR)


def gpus_per_actor(cluster: dict, device: str, workers: int, per: int = 1) -> int:
    """The GPUs each of `workers` actors asks for: none with `--device cpu` or on a cluster without GPUs, else
    `per`; a pool the cluster cannot hold at once is refused now rather than left waiting."""
    have_gpus, have_cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    wants = device != "cpu" and (device != "auto" or have_gpus > 0)
    per = per if wants else 0
    if per * workers > have_gpus:
        raise UserError(f"--engine ray: {workers} actor(s) x {per} GPU(s) (--device {device}) need "
                        f"{per * workers} GPUs; the Ray cluster has {have_gpus:g}")
    if workers > have_cpus:
        raise UserError(f"--engine ray: --ray_workers {workers} needs a CPU per actor; the Ray cluster has "
                        f"{have_cpus:g}")
    return per


def here() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"


class Ledger:
    """A Ray actor: which part each actor process is working on, for when that process dies."""

    def __init__(self):
        self.parts: dict[int, tuple[int, str]] = {}

    def start(self, pid: int, index: int, where: str):
        self.parts[pid] = (index, where)

    def part_of(self, pid: int) -> tuple[int, str] | None:
        return self.parts.get(pid)


def guarded(fn, index: int, ledger=None) -> bytes:
    """`fn()` as a stage's answer for part `index`: (True, its value), or (False, the error as one line)."""
    if ledger is not None:  # before the work: a process that dies in it can say nothing after
        import ray
        ray.get(ledger.start.remote(os.getpid(), index, here()))
    try:
        return pickle.dumps((True, fn()))
    except Exception as e:  # noqa: BLE001 - every error becomes the part's one line
        return pickle.dumps((False, e.format() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))


def answer(batch: dict, blobs: list) -> dict:
    """A stage's output batch: the parts' indices and their answers (object arrays: bytes kept as they are)."""
    import numpy as np
    out = np.empty(len(blobs), dtype=object)
    out[:] = blobs
    return {"index": batch["index"], "blob": out}


def then(batch: dict, work, ledger=None) -> dict:
    """A later stage's output batch: `work(index, value)` on each part the stage before answered well; a part that
    failed there passes on as it is, so the driver sees where it failed."""
    out = []
    for index, blob in zip(batch["index"], batch["blob"]):
        ok, value = pickle.loads(blob)
        out.append(guarded(lambda i=int(index), v=value: work(i, v), int(index), ledger) if ok else blob)
    return answer(batch, out)


def run_parts(ray, dataset, ledger, on_done):
    """Iterate a plan's rows: `on_done(index, value)` for each finished part; the first failure stops the run."""
    try:
        for row in dataset.iter_rows():
            ok, value = pickle.loads(row["blob"])
            if not ok:
                raise UserError(f"part {int(row['index'])} failed: {value}")
            on_done(int(row["index"]), value)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - Ray wraps an actor's death in several types
        raise _died(ray, e, ledger) from None


def _died(ray, e: BaseException, ledger) -> UserError:
    text = str(e)
    if "creation task" in text:  # the actor's __init__ raised: it could not load its model
        return UserError(f"--engine ray: an actor could not load the model: {one_line(e)}")
    pid = re.search(r"\bpid[:=]\s*(\d+)", text)
    held = None
    if pid is not None:
        try:
            held = ray.get(ledger.part_of.remote(int(pid.group(1))), timeout=10)
        except Exception:  # noqa: BLE001 - the ledger is best effort; the error still says what died
            held = None
    if held is None:
        return UserError(f"--engine ray: an actor died: {one_line(e)}")
    index, where = held
    return UserError(f"part {index} failed on actor ({where}, restarted {RESTARTS} times): {one_line(e)}")


def one_line(e: BaseException) -> str:
    """An exception from Ray as one line: the original error's last line (`Type: message`), not Ray's stack."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, UserError):
        return cause.format()
    if isinstance(cause, BaseException) and not isinstance(cause, type(e)):
        return f"{type(cause).__name__}: {_first_line(str(cause))}"
    text = [line.strip() for line in str(e).splitlines() if line.strip()]
    errors = [line for line in text if ("Error:" in line or "Exception:" in line) and not line.startswith("ray.")]
    if errors:
        return re.sub(r"\x1b\[[0-9;]*m", "", errors[-1])
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _first_line(s: str) -> str:
    lines = [line for line in s.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""
