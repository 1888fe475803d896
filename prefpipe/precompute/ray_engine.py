"""`prefpipe precompute --engine ray`: phase one on a pool of Ray actors, one loaded model each.

Decisions a user may want to know:

- **Same cache.** The driver plans the parts exactly as the local engine does (same blocks, identity, resume,
  manifest: `prefpipe.precompute.run`); only the scoring and the writing of each part move to the actors. A cache
  written this way cannot be told from one written by a single process, and either engine resumes the other's
  parts.
- **The driver tokenizes and ships token ids.** Duplicate counts run over the whole input in order and a
  single-example KTO block borrows its partner from the block before, so the blocks are prepared one after the
  other on the driver; the actors receive ids and never see text. Tokenizing costs well under a millisecond a row,
  thousands of times less than scoring it with a billion-parameter model, so one driver keeps many GPUs busy.
  The driver stays at most two parts ahead of each actor, so its memory does not grow with the input.
- **Plain Ray actors, not `ray.data`'s map_batches.** Ray Data streams a dataset it reads itself; here the
  source is the driver's ordered stream of tokenized parts, the cache identity needs the loaded backend's
  provenance before any part is scanned for resume, and a failure must name its part. An explicit pool of
  actors (one `score_part` call per part, two queued per actor) does all three without a Ray Data plan.
- **Each actor writes its part** atomically into `--out` (`prefpipe.data.cache.write_part`), so `--out` must be a
  directory every node sees (a shared file system). Joining a cluster (`--ray_address`) refuses a relative
  `--out`. The driver writes the manifest once every part exists.
- **Resources.** One CPU per actor, plus GPUs: none with `--device cpu` or on a cluster without GPUs, else one
  (hf) or `--tensor_parallel_size` (vllm; the engine's tensor parallelism stays inside the actor). A pool the
  cluster cannot hold at once is refused before anything loads rather than left waiting.
- **Faults.** An actor that dies (its process killed, its node lost) is restarted by Ray, reloads the model and
  scores its part again (up to 3 times). An actor that cannot load the model, or a part that fails, stops the run
  with one line naming the part and the actor's error. Ctrl-C or a killed driver leaves the parts written so
  far, and the same command continues from them.
- **Ray's own instance.** With no `--ray_address` the command starts a local instance (about 20-30 s) and stops
  it at the end; a process that has already called `ray.init` (a notebook, the tests) is used as it is.

`PREFPIPE_RAY_TEST_CRASH=INDEX:MARKER` (a test seam): the actor that scores part INDEX exits hard, as a process
killed mid-part would: once, unless the file MARKER exists (it creates it first); every time with no MARKER.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter
from pathlib import Path

from prefpipe.data.tokenize import SeenHashes
from prefpipe.errors import UserError
from prefpipe.precompute.backend import make_backend
from prefpipe.precompute.blocks import part_counts, prepare_block, write_block
from prefpipe.precompute.progress import rows_to_process
from prefpipe.progress_bar import progress_bar

INSTALL_HINT = "install it with `pip install 'prefpipe[ray]'`"
RESTARTS = 3  # per actor: Ray restarts a dead actor and retries its part this many times
QUEUED = 2  # parts sent to each actor ahead of time, so it never waits for the driver


def import_ray():
    try:
        import ray
    except ImportError as e:
        if e.name and e.name.split(".")[0] == "ray":
            raise UserError(f"--engine ray needs Ray, which is not installed here; {INSTALL_HINT}")
        raise UserError(f"Ray is installed but cannot be imported ({e}); {INSTALL_HINT}")
    return ray


class Scorer:
    """One Ray actor: a backend loaded once, scoring and writing whole parts."""

    def __init__(self, backend: str, options, crash: tuple | None = None):
        self.backend = make_backend(backend, options)
        self.crash = crash

    def provenance(self) -> tuple[dict, str]:
        return self.backend.provenance(), f"{socket.gethostname()} pid {os.getpid()}"

    def score_part(self, cols: dict, rows: dict, counts: dict, kind: str, per_token: bool, meta: dict,
                   out: str) -> dict:
        if self.crash is not None and self.crash[0] == rows["index"]:
            index, marker = self.crash
            if not marker:
                os._exit(1)
            if not os.path.exists(marker):
                Path(marker).touch()
                os._exit(1)
        return write_block(cols, rows, Counter(counts), kind, self.backend, per_token, True, meta, Path(out))


class RayEngine:
    """What `run.py` calls for `--engine ray`: `start()` (the actors, as a backend stand-in for the metadata)
    and `score_parts(...)` (the driver's loop). Constructing it checks the options."""

    def __init__(self, cfg, procs):
        if procs.joined or procs.sharded:
            raise UserError("--engine ray spreads the parts over its actors itself; run it as one process, "
                            "without torchrun or --shard")
        if cfg.no_reference:
            raise UserError("--engine ray scores on its actors, and --no_reference scores nothing; drop --engine")
        if cfg.ray_address and not Path(cfg.out).is_absolute():
            raise UserError("--out must be an absolute path when joining a Ray cluster (--ray_address): every "
                            "node writes its parts there, so it must be a directory all nodes see",
                            file=str(cfg.out))
        self.ray = import_ray()
        self.cfg = cfg
        self.actors: list = []
        self.where: list[str] = []  # each actor's host and pid, for error messages
        self.provenance_: dict | None = None
        self.connected = False  # this command called ray.init, so it also calls ray.shutdown
        self.crash = _crash_seam()

    # ------------------------------------------------------------ the actors

    def start(self) -> RayEngine:
        ray, cfg = self.ray, self.cfg
        if not ray.is_initialized():
            connect(ray, cfg)
            self.connected = True
        try:
            num_gpus = _gpus_per_actor(cfg, ray.cluster_resources(), cfg.ray_workers)
            remote = ray.remote(Scorer).options(num_cpus=1, num_gpus=num_gpus, max_restarts=RESTARTS,
                                                max_task_retries=RESTARTS)
            from dataclasses import replace
            options = replace(cfg.backend_options, device="cuda" if num_gpus else "cpu")
            model = Path(cfg.model)
            if model.exists():  # a local directory: the actors (on other nodes too) need its absolute path
                options = replace(options, model=str(model.resolve()))
            self.actors = [remote.remote(cfg.backend, options, self.crash) for _ in range(cfg.ray_workers)]
            self.provenance_ = self._loaded()
        except BaseException:
            self.close()
            raise
        return self

    def _loaded(self) -> dict:
        """Every actor's backend provenance, as each finishes loading; the first failure stops the run at once.
        All must agree: one cache is scored one way (nodes with different GPUs could pick different dtypes)."""
        ray = self.ray
        pending = {a.provenance.remote(): i for i, a in enumerate(self.actors)}
        got: dict[int, tuple] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                got[i] = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - Ray wraps the actor's error in several types
                raise UserError(f"--engine ray: actor {i} could not load the model: {one_line(e)}")
        self.where = [got[i][1] for i in range(len(self.actors))]
        first = got[0][0]
        for i in range(1, len(self.actors)):
            if got[i][0] != first:
                raise UserError(f"--engine ray: actors disagree on how they score (actor 0 on {self.where[0]}: "
                                f"{first}; actor {i} on {self.where[i]}: {got[i][0]}); give every actor the same "
                                "kind of device, or set --dtype")
        return first

    def provenance(self) -> dict:
        return self.provenance_

    def close(self):
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self.connected:
            self.ray.shutdown()
            self.connected = False

    # ------------------------------------------------------------ the driver's loop

    def score_parts(self, cfg, procs, ds, kind, pt, backend, meta, out: Path, done: dict) -> dict:
        """What `run._score_parts` returns, for one process whose actors score every part not in `done`."""
        pool = _Pool(self.ray, self.actors, self.where)
        bar = _Bar(cfg, ds, done)
        seen = SeenHashes()
        prev_records, n_parts, reused = None, 0, 0
        args = (kind, cfg.per_token, meta, str(out.resolve()))
        try:
            for index, records in enumerate(ds.batches()):
                n_parts += 1
                if index in done:
                    seen.add([r.content_hash for r in records])
                    reused += 1
                else:
                    cols, rows, counts = prepare_block(index, records, prev_records, cfg, ds, kind, pt, seen)
                    while pool.busy >= QUEUED * len(self.actors):
                        bar.done(*pool.next_done())
                    pool.submit(len(records), cols, rows, dict(counts), *args)
                prev_records = records
            while pool.busy:
                bar.done(*pool.next_done())
        finally:
            bar.close()
        return {"n_parts": n_parts, "written": bar.written, "tokens": bar.tokens,
                "parts_written": len(bar.written), "reused": reused}


class _Pool:
    """Parts in flight: each goes to the actor with the fewest queued."""

    def __init__(self, ray, actors, where):
        self.ray, self.actors, self.where = ray, actors, where
        self.queued = [0] * len(actors)
        self.flight: dict = {}  # ObjectRef -> (part index, actor, input rows)

    @property
    def busy(self) -> int:
        return len(self.flight)

    def submit(self, n_rows: int, cols: dict, rows: dict, *args):
        i = min(range(len(self.actors)), key=self.queued.__getitem__)
        self.queued[i] += 1
        self.flight[self.actors[i].score_part.remote(cols, rows, *args)] = (rows["index"], i, n_rows)

    def next_done(self) -> tuple[dict, int]:
        """(the part's metadata entry, its input rows) of the next part to finish."""
        ready, _ = self.ray.wait(list(self.flight), num_returns=1)
        index, i, n_rows = self.flight.pop(ready[0])
        self.queued[i] -= 1
        try:
            return self.ray.get(ready[0]), n_rows
        except Exception as e:  # noqa: BLE001
            cause = getattr(e, "cause", None)
            if isinstance(cause, UserError):
                raise UserError(f"part {index} (actor {i}): {cause.format()}")
            retried = f", restarted {RESTARTS} times" if isinstance(e, self.ray.exceptions.ActorDiedError) else ""
            raise UserError(f"part {index} failed on actor {i} ({self.where[i]}{retried}): {one_line(e)}")


class _Bar:
    """The driver's one progress bar: input rows of the parts to score, with tokens/s over all actors."""

    def __init__(self, cfg, ds, done: dict):
        total = rows_to_process(ds.row_counts, cfg.part_rows, lambda i: i not in done) if cfg.progress else None
        actors = f"{cfg.ray_workers} ray actor{'s' if cfg.ray_workers > 1 else ''}"
        self.bar = progress_bar(total, f"precompute ({actors})", "row", show=cfg.progress)
        self.t0, self.tokens, self.written = time.perf_counter(), 0, {}

    def done(self, part: dict, n_rows: int):
        self.written[part["index"]] = part_counts(part)
        self.tokens += part["tokens_scored"]
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tok, {rate:,.0f} tok/s", refresh=False)
        self.bar.update(n_rows)

    def close(self):
        self.bar.close()


# ---------------------------------------------------------------- helpers

def connect(ray, cfg):
    import logging
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}  # not even the token-auth notice
    if cfg.ray_address:
        try:
            ray.init(address=cfg.ray_address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"--ray_address {cfg.ray_address}: cannot join the Ray cluster ({one_line(e)})")
        return
    # Enough logical CPUs for every actor even on a small machine (one CPU each; Ray does not oversubscribe).
    ray.init(num_cpus=max(os.cpu_count() or 1, cfg.ray_workers), include_dashboard=False, **quiet)


def _gpus_per_actor(cfg, cluster: dict, workers: int) -> float:
    have_gpus, have_cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    device = cfg.backend_options.device
    wants = device != "cpu" and (device != "auto" or have_gpus > 0)
    per = (cfg.backend_options.tensor_parallel_size if cfg.backend == "vllm" else 1) if wants else 0
    if per * workers > have_gpus:
        raise UserError(f"--engine ray: {workers} actor(s) x {per} GPU(s) (--device {device}) need "
                        f"{per * workers} GPUs; the Ray cluster has {have_gpus:g}")
    if workers > have_cpus:
        raise UserError(f"--engine ray: --ray_workers {workers} needs a CPU per actor; the Ray cluster has "
                        f"{have_cpus:g}")
    return per


def _crash_seam() -> tuple | None:
    spec = os.environ.get("PREFPIPE_RAY_TEST_CRASH")
    if not spec:
        return None
    index, marker = spec.split(":", 1)
    return int(index), marker


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
        return errors[-1]
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _first_line(s: str) -> str:
    lines = [line for line in s.strip().splitlines() if line.strip()]
    return lines[0].strip() if lines else ""
