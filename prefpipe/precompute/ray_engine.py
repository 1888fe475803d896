"""`prefpipe precompute --engine ray`: phase one as a Ray Data plan (docs/ray.md).

The plan, one row per part still to write, in three stages:

1. **Read** (one actor, on the driver's node): the input read in order, as the local engine reads it, cut into the
   same parts. Parts are numbered over the whole input and duplicates are counted against every earlier row, so
   one reader walks the input once; it is cheap next to the stages after it (it parses, it does not tokenize).
   Running on the driver's node, it needs the input only there.
2. **Tokenize** (a pool of CPU actors, 1 to `--ray_workers`, grown by Ray Data as the queue asks): each part's
   rows through the chat template and the tokenizer into token ids (`prefpipe.precompute.blocks.prepare_block`),
   with a KTO part's mismatched partners pinned.
3. **Score** (a pool of `--ray_workers` actors, one backend loaded once each, with the GPUs of
   `prefpipe.ray_cluster.gpus_per_actor`): each part's ids scored and the part written atomically into `--out`,
   which must therefore be a directory every node sees; joining a cluster refuses a relative `--out`.

The actors receive ids, never text to re-tokenize, so the cache is the local engine's: same parts, identity,
resume and manifest (`prefpipe.precompute.run` plans and finishes it as for every engine, and either engine
resumes the other's parts). Each scoring actor checks, once loaded, that it scores as the plan says (dtype,
quantization): nodes with different GPUs could otherwise pick different dtypes for one cache.

Faults: a dead actor is restarted by Ray and its part retried (`RESTARTS` times); a part that fails, or an actor
that keeps dying on one part, stops the run in one line naming the part (`prefpipe.ray_cluster`); an actor that
cannot load the model stops it within seconds. Ctrl-C or a killed driver leaves the parts written so far, and the
same command continues from them. With no `--ray_address` the command starts a local instance and stops it at
the end.

`PREFPIPE_RAY_TEST_CRASH=INDEX:MARKER` (a test seam): the actor that scores part INDEX exits hard, as a process
killed mid-part would: once, unless the file MARKER exists (it creates it first); every time with no MARKER.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from prefpipe.data import identity
from prefpipe.data.cache import part_name, read_part_metadata
from prefpipe.data.tokenize import PairTokenizer, SeenHashes
from prefpipe.errors import UserError
from prefpipe.model_paths import resolve_model_dir
from prefpipe.precompute.backend import make_backend
from prefpipe.precompute.blocks import part_counts, prepare_block, write_block
from prefpipe.precompute.progress import part_sizes, rows_to_process
from prefpipe.progress_bar import progress_bar
from prefpipe.ray_cluster import (RESTARTS, Ledger, answer, check_out, connect, gpus_per_actor, guarded, here,
                                  import_ray, quiet_data, run_parts, then)
from prefpipe.tokenizer import load_tokenizer


class Reader:
    """Stage 1: part INDEX of the input -> its records, the records of the part before (a single-example KTO part
    borrows a partner there) and its duplicate count against every earlier row."""

    def __init__(self, ds, done: set, kto: bool):
        self.parts = enumerate(ds.batches())
        self.done, self.kto = done, kto
        self.seen, self.prev, self.ahead = SeenHashes(), None, {}

    def __call__(self, batch: dict) -> dict:
        return answer(batch, [guarded(lambda i=int(i): self._part(i), int(i)) for i in batch["index"]])

    def _part(self, index: int) -> tuple:
        while index not in self.ahead:  # Ray Data may ask out of order: keep what was read on the way
            i, records = next(self.parts, (None, None))
            if i is None:
                raise UserError(f"the input ended before part {index} (it changed while being read?)")
            duplicates = self.seen.add([r.content_hash for r in records])
            if i not in self.done:
                self.ahead[i] = (records, self.prev if self.kto else None, duplicates)
            self.prev = records
        return self.ahead.pop(index)


class Tokenizer:
    """Stage 2: a part's records -> the block `write_block` scores (columns, the part's row counts, counts)."""

    def __init__(self, cfg, ds, kind: str):
        self.cfg, self.ds, self.kind = cfg, ds, kind
        self.pt = PairTokenizer(load_tokenizer(str(resolve_model_dir(cfg.model))), cfg.input.tokenize_settings())

    def __call__(self, batch: dict) -> dict:
        return then(batch, self._prepare)

    def _prepare(self, index: int, value: tuple) -> tuple:
        records, prev, duplicates = value
        cols, rows, counts = prepare_block(index, records, prev, self.cfg, self.ds, self.kind, self.pt, SeenHashes())
        return cols, {**rows, "duplicates": duplicates}, dict(counts)  # counted by the reader, over all rows


class Scorer:
    """Stage 3: a backend loaded once; a prepared block -> its part written into `out`, and the part's entry."""

    def __init__(self, cfg, options, meta: dict, out: str, kind: str, ledger, crash: tuple | None):
        self.backend = make_backend(cfg.backend, options)
        self.meta = {**meta, "backend": self.backend.provenance()}
        if identity.identity_of(self.meta) != identity.identity_of(meta):
            raise UserError(f"--engine ray: the actor on {here()} scores as {self.meta['backend']}, not as planned "
                            f"({meta['backend']}); give every actor the same kind of device, or set --dtype")
        self.per_token, self.out, self.kind, self.ledger, self.crash = cfg.per_token, Path(out), kind, ledger, crash

    def __call__(self, batch: dict) -> dict:
        return then(batch, self._score, self.ledger)

    def _score(self, index: int, value: tuple) -> tuple:
        self._crash_seam(index)
        cols, rows, counts = value
        part = write_block(cols, rows, Counter(counts), self.kind, self.backend, self.per_token, True, self.meta,
                           self.out)
        return part, rows["rows_read"], self.meta["backend"]

    def _crash_seam(self, index: int):
        if self.crash is not None and self.crash[0] == index:
            marker = self.crash[1]
            if not marker or not os.path.exists(marker):
                if marker:
                    Path(marker).touch()
                os._exit(1)


class RayEngine:
    """What `run.py` calls for `--engine ray`: `start()` (joins Ray and checks the pool fits, loading nothing),
    `score_parts(...)` (the plan, run) and `close()`. Constructing it checks the options."""

    def __init__(self, cfg, procs):
        if procs.joined or procs.sharded:
            raise UserError("--engine ray spreads the parts over its actors itself; run it as one process, "
                            "without torchrun or --shard")
        if cfg.no_reference:
            raise UserError("--engine ray scores on its actors, and --no_reference scores nothing; drop --engine")
        check_out(cfg)
        self.ray, self.cfg = import_ray(), cfg
        self.connected, self.gpus = False, 0

    def start(self) -> RayEngine:
        self.connected = connect(self.ray, self.cfg)
        try:
            per = self.cfg.backend_options.tensor_parallel_size if self.cfg.backend == "vllm" else 1
            self.gpus = gpus_per_actor(self.ray.cluster_resources(), self.cfg.backend_options.device,
                                       self.cfg.ray_workers, per)
        except BaseException:
            self.close()
            raise
        return self

    def provenance(self) -> None:
        return None  # each scoring actor reports its own, once loaded (see `Scorer`)

    def close(self):
        if self.connected:
            self.ray.shutdown()
            self.connected = False

    def score_parts(self, cfg, procs, ds, kind, pt, backend, meta, out: Path, done: dict) -> dict:
        """What `run._score_parts` returns, plus `backend`: the provenance the scoring actors loaded."""
        n_parts = len(part_sizes(ds.row_counts, cfg.part_rows))
        todo = [i for i in range(n_parts) if i not in done]
        bar = _Bar(cfg, ds, done)
        try:
            provenance = self._run(ds, kind, meta, out, set(done), todo, bar) if todo else None
        finally:
            bar.close()
        if provenance is None:  # nothing scored now: the parts kept say how they were scored
            provenance = read_part_metadata(out / part_name(0))["backend"]
        return {"n_parts": n_parts, "written": bar.written, "tokens": bar.tokens, "parts_written": len(bar.written),
                "reused": n_parts - len(todo), "backend": provenance}

    def _run(self, ds, kind, meta, out: Path, done: set, todo: list, bar):
        ray, cfg = self.ray, self.cfg
        quiet_data(ray)
        ledger = ray.remote(Ledger).options(num_cpus=0).remote()
        options = replace(cfg.backend_options, device="cuda" if self.gpus else "cpu")
        model = Path(cfg.model)
        if model.exists():  # a local directory: the actors (on other nodes too) need its absolute path
            options = replace(options, model=str(model.resolve()))
        on_driver = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)
        pool, workers = ray.data.ActorPoolStrategy, min(cfg.ray_workers, len(todo))
        plan = (ray.data.from_items([{"index": i} for i in todo], override_num_blocks=len(todo))
                .map_batches(Reader, batch_size=1, compute=pool(size=1), num_cpus=0.5, max_restarts=0,
                             fn_constructor_args=(ds, done, kind == "unpaired"), scheduling_strategy=on_driver)
                .map_batches(Tokenizer, batch_size=1, compute=pool(min_size=1, max_size=workers),
                             num_cpus=0.5, fn_constructor_args=(cfg, ds, kind))
                .map_batches(Scorer, batch_size=1, compute=pool(size=workers), num_cpus=1,
                             num_gpus=self.gpus, max_restarts=RESTARTS, max_task_retries=RESTARTS,
                             fn_constructor_args=(cfg, options, meta, str(out.resolve()), kind, ledger,
                                                  _crash_seam())))
        got = {}

        def finished(index, value):
            part, n_rows, got["backend"] = value
            bar.done(part, n_rows)
        try:
            run_parts(ray, plan, ledger, finished)
        finally:
            ray.kill(ledger)
        return got.get("backend")


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


def _crash_seam() -> tuple | None:
    spec = os.environ.get("PREFPIPE_RAY_TEST_CRASH")
    if not spec:
        return None
    index, marker = spec.split(":", 1)
    return int(index), marker
