"""The phase-one driver: read, tokenize, pin KTO partners, score with a backend, write parts, finalise.

`run_precompute(PrecomputeConfig(...))` is what `prefpipe precompute` runs; the pipeline and tests call it
in-process. The driver does not care which backend scores: it hands `backend.score` token-id lists and writes what
comes back.

Decisions a user may want to know:

- **Parts.** Input rows are read in blocks of `--part_rows` (per input file); block i becomes `part-0000i.parquet`,
  written atomically. `manifest.json` is written last; a directory without it is unfinished and refused on read.
- **Resume.** Rerunning the same command keeps every finished part whose metadata matches this run (model,
  tokenizer, tokenization settings, data fingerprint and columns, turn marker, kind, backend, dtype,
  `--part_rows`, prefpipe version: `prefpipe.data.identity`) and passes the checks `read_cache` makes (row count,
  finite reference log-probs), and scores the rest, a part that fails those checks included. A part from a
  different run stops the command with an error naming what differs; `--overwrite` deletes the old parts
  instead. Paths may differ between runs; fingerprints may not.
- **Manifest.** It records each part's sha256 and run identity, so a part changed or copied in after the cache
  was finished is refused on read.
- **Sharding.** Part i belongs to process `i % n`: under `torchrun` n is the world size and rank 0 writes the
  manifest after every rank is done; with `--shard i/n` (independent processes, e.g. one per GPU) each process
  writes its parts, and whichever process finds all parts present writes the manifest. Every process reads the
  whole input (cheaply) so that all agree on the blocks; only the owner tokenizes and scores a block.
- **Engines.** `--engine ray` (`prefpipe.precompute.ray_engine`) keeps all of this (planning, tokenizing, resume,
  the manifest) in the driver and hands each prepared block to a Ray actor that scores it and writes its part.
- **Counts.** Each part records its own counts and skipped rows in its metadata; the manifest sums them.
  `tokens_scored` counts every token forwarded (prompt + response, per scored sequence); `response_tokens` counts
  the scored positions. Duplicates are counted across the whole input (earlier blocks included) and kept.
"""

from __future__ import annotations

import datetime
import importlib
import os
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from prefpipe.data import identity
from prefpipe.data.cache import MANIFEST, part_digest, part_name, read_manifest, read_part_metadata, write_manifest
from prefpipe.data.tokenize import PairTokenizer, SeenHashes
from prefpipe.dist import Procs, join
from prefpipe.errors import UserError
from prefpipe.fileio import LOCK_FILE, OutputLock, check_writable, is_lock_file
from prefpipe.model_paths import resolve_model_dir
from prefpipe.precompute.backend import make_backend
from prefpipe.precompute.blocks import now, part_counts, process_block
from prefpipe.precompute.config import PrecomputeConfig  # noqa: F401 (callers import it from here)
from prefpipe.precompute.plan import fingerprints, kind_of, plan, scan_parts
from prefpipe.precompute.progress import rows_to_process
from prefpipe.precompute.verify import verify_cache
from prefpipe.progress_bar import progress_bar
from prefpipe.tokenizer import load_tokenizer, quiet_transformers
from prefpipe.wording import plural

COUNT_KEYS = ("rows_read", "rows_kept", "rows_written", "rows_skipped", "prompt_truncated", "response_truncated",
              "duplicates", "tokens_scored", "response_tokens", "kl_truncated", "kl_borrowed")


# ---------------------------------------------------------------- processes

def _procs(shard: str | None) -> Procs:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if shard:
            raise UserError("--shard is for independent processes; under torchrun the ranks shard the parts "
                            "already")
        # Collectives carry only a few small Python objects, so gloo serves CPU and GPU runs alike. The long
        # timeout covers ranks that finish their parts at different times.
        return join("gloo", datetime.timedelta(days=7))
    if shard:
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard must look like i/n, for example 0/4 (got {shard!r})")
        if not (n >= 1 and 0 <= i < n):
            raise UserError(f"--shard {shard}: need 0 <= i < n")
        return Procs(i, n, sharded=True)
    return Procs()


def _device_for(cfg: PrecomputeConfig, procs: Procs) -> str:
    device = cfg.backend_options.device
    if not procs.joined or device not in ("auto", "cuda"):
        return device
    import torch
    if torch.cuda.is_available():
        torch.cuda.set_device(procs.local_rank)
        return f"cuda:{procs.local_rank}"
    return device


# ---------------------------------------------------------------- metadata

def _scan_parts(out: Path, expected: dict) -> dict[int, dict]:
    """Finished, sound parts of this run: {index: part counts}; a part of another run is an error
    (`prefpipe.precompute.plan.scan_parts`)."""
    scan = scan_parts(out, expected)
    scan.refuse()
    return {i: part_counts(p) for i, p in scan.done.items()}


def _clean(out: Path, *, parts: bool):
    for f in out.glob(".part-*.parquet.tmp-*"):
        try:
            pid = int(f.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)  # left by a killed run
        except (ValueError, PermissionError):
            pass
    if parts:
        for f in list(out.glob("part-*.parquet")) + [out / MANIFEST]:
            f.unlink(missing_ok=True)


# ---------------------------------------------------------------- engines

# `--engine NAME` -> "module:Class" of an engine that scores the parts in other processes (`local`, the default,
# is this module's own loop). Named by string, like the backends, so that this module never imports Ray.
ENGINES = {"ray": "prefpipe.precompute.ray_engine:RayEngine"}


def _engine(cfg: PrecomputeConfig, procs: Procs):
    """The engine for `--engine`, None for local; constructing it checks its options (Ray installed, --out)
    before any model is loaded."""
    if cfg.engine == "local":
        return None
    module, cls = ENGINES[cfg.engine].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, procs)


# ---------------------------------------------------------------- the run

def _finalise(out: Path, meta: dict, n_parts: int, parts: dict[int, dict]) -> dict:
    totals = Counter()
    skipped = Counter()
    for i in range(n_parts):
        p = parts[i]
        totals.update({k: p.get(k, 0) for k in COUNT_KEYS})
        skipped.update(p["skipped"])
    counts = {k: int(totals[k]) for k in COUNT_KEYS}
    counts["skipped"] = dict(sorted(skipped.items()))
    if meta["kind"] == "paired":
        counts.pop("kl_truncated")
        counts.pop("kl_borrowed")
    if counts["rows_written"] == 0:
        raise UserError(f"no rows left to write: all {plural(counts['rows_read'], 'row')} were skipped "
                        f"({', '.join(f'{k}: {v}' for k, v in counts['skipped'].items())})", file=meta["data"]["path"])
    run = identity.key(identity.identity_of(meta))  # every part matched it in _scan_parts, or was written now
    write_manifest(out, {**meta, "created_at": now(), "counts": counts},
                   [{"file": part_name(i), "rows": parts[i]["rows_written"],
                     "content_sha256": part_digest(out / part_name(i), meta["kind"]), "identity": run}
                    for i in range(n_parts)])
    return counts


def run_precompute(cfg: PrecomputeConfig) -> dict:
    """Write the cache at `cfg.out` and return a summary dict (the manifest's counts plus this run's timing).

    `--out` is checked before any model is loaded: it must be creatable and writable, and an existing non-empty
    directory must be a cache (see `_check_out`). The command holds `--out`'s output lock throughout, so a second
    precompute into the same cache is refused; the `--shard i/n` processes share it and each locks its own shard."""
    t0 = time.perf_counter()
    if cfg.part_rows < 1:
        raise UserError(f"--part_rows must be positive (got {cfg.part_rows})")
    if cfg.overwrite and cfg.shard:
        raise UserError("--overwrite cannot be combined with --shard: one shard would delete another's parts")
    procs = _procs(cfg.shard)
    engine = _engine(cfg, procs)
    _check_out(Path(cfg.out))
    with ExitStack() as locks:
        what = "--out"
        if procs.sharded:
            locks.enter_context(OutputLock(cfg.out, what, shared=True))
            locks.enter_context(OutputLock(cfg.out, f"{what} (shard {cfg.shard})",
                                           name=f"{LOCK_FILE}.shard-{procs.rank}-of-{procs.world}"))
        elif procs.leader:
            locks.enter_context(OutputLock(cfg.out, what))
        return _run(cfg, procs, t0, engine)


def _is_cache_file(name: str) -> bool:
    return (name == MANIFEST or is_lock_file(name) or (name.startswith("part-") and name.endswith(".parquet"))
            or name.startswith(".part-") or name.startswith(f".{MANIFEST}.tmp-"))


def _check_out(out: Path):
    """`--out` must be creatable and writable, and, when it already holds files, a cache (parts, a manifest, the
    lock): precompute into a data folder would scatter its parts among the user's files."""
    check_writable(out, "--out")
    if out.is_dir():
        strangers = sorted(p.name for p in out.iterdir() if not _is_cache_file(p.name))
        if strangers:
            shown = ", ".join(strangers[:3]) + (f" and {len(strangers) - 3} more" if len(strangers) > 3 else "")
            raise UserError(f"--out is a non-empty directory that is not a cache (it holds {shown}); give a new "
                            "or empty directory, or an existing cache", file=str(out))


def _run(cfg: PrecomputeConfig, procs: Procs, t0: float, engine=None) -> dict:
    ds = cfg.input.dataset(cfg.data, batch_rows=cfg.part_rows, kto_view=cfg.kto)
    ds.validate()  # every row, before any model is loaded: a bad row deep in the file costs no scoring
    quiet_transformers()  # after the data's checks: importing transformers costs a second a bad input need not wait
    kind = kind_of(cfg, ds)
    if cfg.no_reference and kind == "unpaired":
        raise UserError("--no_reference writes an ORPO cache of pairs; KTO (--kto or unpaired data) needs "
                        "reference log-probs", file=str(cfg.data))
    pt = PairTokenizer(load_tokenizer(str(resolve_model_dir(cfg.model))), cfg.input.tokenize_settings())
    ds.check_tokenizer(pt.tok)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError("--out exists and is not a directory", file=str(out))
    options = replace(cfg.backend_options, device=_device_for(cfg, procs))
    p = plan(cfg, ds, fingerprints(cfg.model, pt.tok), options)
    p.parts().refuse()  # a part of another run stops the command before the engine loads
    if engine is not None:
        backend = engine.start()  # a stand-in with the actors' provenance; close() stops them
    else:
        backend = None if cfg.no_reference else make_backend(cfg.backend, options)
    try:
        loaded = None if backend is None else backend.provenance()  # None from an engine whose actors load it
        meta = p.metadata if loaded is None else {**p.metadata, "backend": loaded}
        expected = identity.identity_of(meta)
        if expected != p.expected:
            differ = {k: (p.expected.get(k), expected.get(k)) for k in expected if expected.get(k) != p.expected.get(k)}
            raise RuntimeError(f"backend {cfg.backend}'s loaded engine does not match what its numerics() promised: "
                               f"{differ}")
        if procs.leader:
            out.mkdir(parents=True, exist_ok=True)
            if not procs.joined and not procs.sharded:
                _clean(out, parts=cfg.overwrite)
            elif cfg.overwrite:
                _clean(out, parts=True)
        procs.gather(None)  # the leader has prepared --out
        done = {} if cfg.overwrite else {i: part_counts(x) for i, x in p.parts().done.items()}
        score = _score_parts if engine is None else engine.score_parts
        run = score(cfg, procs, ds, kind, pt, backend, meta, out, done)
        if "backend" in run:  # the engine's actors loaded the backend: its parts carry their provenance
            meta = {**meta, "backend": run["backend"]}
    finally:
        if backend is not None:
            backend.close()
    counts, finalised = _finish_cache(procs, out, meta, expected, run)
    wall = time.perf_counter() - t0
    summary = {"cache": str(out), "leader": procs.leader, "finalised": finalised, "kind": kind,
               "has_reference": not cfg.no_reference, "counts": counts, "parts": run["n_parts"],
               "parts_written": run["parts_written"], "parts_reused": run["reused"],
               "tokens_this_run": run["tokens"], "wall_s": wall,
               "tokens_per_s": run["tokens"] / wall if wall > 0 else 0.0,
               "skip_examples": _first_skips(out, run["n_parts"]) if finalised else {},
               "skipped_files": list(ds.skipped_files)}
    if cfg.verify and finalised and procs.leader:
        summary["verify"] = verify_cache(str(out), cfg.model, cfg.verify, device=cfg.backend_options.device)
    return summary


def _progress(cfg: PrecomputeConfig, procs: Procs, ds):
    """The bar (rows, with a total) and the callback that shows tokens and tokens/s on it."""
    show = cfg.progress and procs.leader
    bar = progress_bar(rows_to_process(ds.row_counts, cfg.part_rows, procs.owns) if show else None, "precompute",
                       "row", show=show)
    tokens, t_scoring = [0], time.perf_counter()

    def on_progress(_seqs, n_tokens):
        tokens[0] += n_tokens
        rate = tokens[0] / max(time.perf_counter() - t_scoring, 1e-9)
        bar.set_postfix_str(f"{tokens[0]:,} tok, {rate:,.0f} tok/s", refresh=False)
    return bar, on_progress


def _score_parts(cfg, procs: Procs, ds, kind, pt, backend, meta, out: Path, done: dict) -> dict:
    """Every block this process owns and has not finished, scored and written as its part; then the totals over
    all processes (every process must call this: it ends in collectives)."""
    bar, on_progress = _progress(cfg, procs, ds)
    seen = SeenHashes()  # 8 bytes a row: see its docstring
    prev_records = None
    n_parts, written, reused, tokens, failure = 0, {}, 0, 0, None
    try:
        for index, records in enumerate(ds.batches()):
            n_parts += 1
            if procs.owns(index) and index not in done:
                part = process_block(index, records, prev_records, cfg, ds, kind, pt, backend, seen, meta, out,
                                      on_progress)
                written[index] = part_counts(part)
                tokens += part["tokens_scored"]
            else:
                seen.add([r.content_hash for r in records])
                reused += procs.owns(index)
            if procs.owns(index):
                bar.update(len(records))
            prev_records = records
    except Exception as e:  # noqa: BLE001 - peers must learn of it before they wait on the manifest
        failure = e
    bar.close()
    _agree(procs, failure)
    return {"n_parts": n_parts, "written": written, "tokens": sum(procs.gather(tokens)),
            "parts_written": sum(procs.gather(len(written))), "reused": sum(procs.gather(reused))}


def _finish_cache(procs: Procs, out: Path, meta: dict, expected: dict, run: dict) -> tuple[dict | None, bool]:
    """The manifest, once every part exists (the leader under torchrun; any `--shard` process that finds them
    all): (counts, finalised)."""
    n_parts, counts, failure = run["n_parts"], None, None
    if procs.leader or procs.sharded:
        try:
            parts = {**_scan_parts(out, expected), **run["written"]}
            missing = [i for i in range(n_parts) if i not in parts]
            if not missing:
                counts = _finalise(out, meta, n_parts, parts)
            elif not procs.sharded:
                raise RuntimeError(f"parts {missing[:5]} are missing after every process finished")
        except Exception as e:  # noqa: BLE001
            failure = e
    _agree(procs, failure)  # nobody returns before the manifest exists
    finalised = (out / MANIFEST).exists() and (not procs.sharded or counts is not None or
                                                 all(i in _scan_parts(out, expected) for i in range(n_parts)))
    if finalised and counts is None:
        counts = read_manifest(out)["metadata"]["counts"]
    return counts, finalised


def _agree(procs: Procs, failure: Exception | None):
    """Raise here if this process failed, or if a peer did (so no rank waits forever on a dead one)."""
    statuses = procs.gather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    bad = [i for i, s in enumerate(statuses) if s is not None]
    if bad:
        raise UserError(f"rank {bad[0]} failed: {statuses[bad[0]]}")


def _first_skips(out: Path, n_parts: int) -> dict:
    """The first skipped row per reason, for the summary (skip records live in each part's metadata)."""
    first: dict[str, dict] = {}
    for i in range(n_parts):
        meta = read_part_metadata(out / part_name(i)) or {}
        for rec in meta.get("part", {}).get("skip_records", []):
            first.setdefault(rec["reason"], rec)
    return first
