"""The phase-one driver: read, tokenize, pin KTO partners, score with a backend, write parts, finalise.

`run_precompute(PrecomputeConfig(...))` is what `prefpipe precompute` runs; the pipeline and tests call it
in-process. The driver does not care which backend scores: it hands `backend.score` token-id lists and writes what
comes back.

Decisions a user may want to know:

- **Parts.** Input rows are read in blocks of `--part_rows` (per input file); block i becomes `part-0000i.parquet`,
  written atomically. `manifest.json` is written last; a directory without it is unfinished and refused on read.
- **Resume.** Rerunning the same command keeps every finished part whose metadata matches this run (model,
  tokenizer, tokenization settings, data fingerprint, backend, dtype, `--part_rows`, prefpipe version) and scores
  the rest. A part from a different run stops the command with an error naming what differs; `--overwrite`
  deletes the old parts instead. Paths may differ between runs; fingerprints may not.
- **Sharding.** Part i belongs to process `i % n`: under `torchrun` n is the world size and rank 0 writes the
  manifest after every rank is done; with `--shard i/n` (independent processes, e.g. one per GPU) each process
  writes its parts, and whichever process finds all parts present writes the manifest. Every process reads the
  whole input (cheaply) so that all agree on the blocks; only the owner tokenizes and scores a block.
- **Counts.** Each part records its own counts and skipped rows in its metadata; the manifest sums them.
  `tokens_scored` counts every token forwarded (prompt + response, per scored sequence); `response_tokens` counts
  the scored positions. Duplicates are counted across the whole input (earlier blocks included) and kept.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefpipe import __version__
from prefpipe.data.cache import (MANIFEST, SCHEMA_VERSION, part_name, read_manifest, read_part_metadata,
                                 write_manifest, write_part)
from prefpipe.data.formats import DEFAULT_TURN_MARKER, Columns, Dataset
from prefpipe.data.tokenize import TokenizeSettings, TokenStats
from prefpipe.dist import Procs, join
from prefpipe.errors import UserError
from prefpipe.data import kto_pairs
from prefpipe.precompute.backend import BackendOptions, make_backend

# Keys that may differ between runs that produce the same cache.
VOLATILE = ("created_at", "counts", "part")
VOLATILE_NESTED = (("model", "path"), ("data", "path"))
COUNT_KEYS = ("rows_read", "rows_kept", "rows_written", "rows_skipped", "prompt_truncated", "response_truncated",
              "duplicates", "tokens_scored", "response_tokens", "kl_truncated", "kl_borrowed")


@dataclass(frozen=True)
class PrecomputeConfig:
    """Maps one-to-one to `prefpipe precompute` options."""
    model: str
    data: str
    out: str
    backend: str = "hf"
    dtype: str = "auto"
    device: str = "auto"
    max_length: int = TokenizeSettings.max_length
    max_prompt_length: int = TokenizeSettings.max_prompt_length
    batch_tokens: int = BackendOptions.batch_tokens
    kto: bool = False
    no_reference: bool = False
    part_rows: int = 4096
    columns: Columns = field(default_factory=Columns)
    turn_marker: str = DEFAULT_TURN_MARKER
    tensor_parallel_size: int = BackendOptions.tensor_parallel_size
    gpu_memory_utilization: float = BackendOptions.gpu_memory_utilization
    max_model_len: int | None = None
    chunk_rows: int = BackendOptions.chunk_rows
    shard: str | None = None  # "i/n"
    verify: int = 0
    overwrite: bool = False
    progress: bool = True

    def settings(self) -> TokenizeSettings:
        return TokenizeSettings(self.max_length, self.max_prompt_length)

    def backend_options(self, device: str | None = None) -> BackendOptions:
        return BackendOptions(model=self.model, dtype=self.dtype, device=device or self.device,
                              batch_tokens=self.batch_tokens, tensor_parallel_size=self.tensor_parallel_size,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              max_model_len=self.max_model_len or self.max_length, chunk_rows=self.chunk_rows)


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
    if not procs.joined or cfg.device not in ("auto", "cuda"):
        return cfg.device
    import torch
    if torch.cuda.is_available():
        torch.cuda.set_device(procs.local_rank)
        return f"cuda:{procs.local_rank}"
    return cfg.device


# ---------------------------------------------------------------- metadata

def _identity(meta: dict) -> dict:
    out = {k: v for k, v in meta.items() if k not in VOLATILE}
    for outer, inner in VOLATILE_NESTED:
        if isinstance(out.get(outer), dict):
            out[outer] = {k: v for k, v in out[outer].items() if k != inner}
    return out


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "parts":
            keys += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def _run_metadata(cfg, ds, kind, tokenizer, backend) -> dict:
    from prefpipe.data.fingerprint import model_fingerprint, tokenizer_fingerprint
    meta = {
        "schema_version": SCHEMA_VERSION,
        "prefpipe_version": __version__,
        "kind": kind,
        "has_reference": not cfg.no_reference,
        "model": {"path": str(cfg.model), "fingerprint": model_fingerprint(cfg.model)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization": cfg.settings().metadata(),
        "data": {"path": str(cfg.data), "fingerprint": ds.fingerprint(), "format": ds.format,
                 "columns": asdict(cfg.columns), "turn_marker": cfg.turn_marker},
        "backend": backend.provenance() if backend is not None else {"name": "none"},
        "layout": {"part_rows": cfg.part_rows},
    }
    if kind == "unpaired":
        meta["kto"] = {"source": "paired" if ds.paired else "unpaired",
                       "example_ids": "row_id:chosen / row_id:rejected" if ds.paired else "row_id",
                       "partner_rule": kto_pairs.RULE,
                       "kl_completion": "partner's completion cut from the right to max_length - len(prompt_ids)"}
    return meta


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _scan_parts(out: Path, identity: dict) -> dict[int, dict]:
    """Finished parts whose metadata matches this run: {index: part metadata}. A foreign part is an error."""
    found = {}
    for f in sorted(out.glob("part-*.parquet")):
        try:
            index = int(f.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        meta = read_part_metadata(f)
        if meta is None or "part" not in meta:
            continue  # unreadable: its owner rewrites it
        diff = _differences(_identity(meta), identity)
        if diff:
            raise UserError(f"--out already holds a cache part from a different run ({', '.join(diff[:6])} "
                            "differ); use another --out, or --overwrite to replace it", file=str(f))
        found[index] = meta["part"]
    return found


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


# ---------------------------------------------------------------- one block

def _check_scores(sums, counts, responses, row_ids):
    import math
    for s, c, r, rid in zip(sums, counts, responses, row_ids):
        if c != len(r):
            raise RuntimeError(f"backend scored {c} tokens of a {len(r)}-token response (row {rid})")
        if not math.isfinite(s):
            raise UserError(f"the model gave a non-finite log-prob ({s}) for row {rid}; try --dtype float32")


def _score_block(cols: dict, kind: str, backend, counts: Counter):
    """Add reference columns (or lengths only, with no backend) to `cols` in place."""
    if kind == "paired":
        resp = ("chosen_ids", "rejected_ids")
        out = ("ref_chosen", "ref_rejected")
        lens = ("chosen_len", "rejected_len")
        prompts = cols["prompt_ids"]
    else:
        resp = ("completion_ids", "kl_completion_ids")
        out = ("ref_logp", "ref_kl")
        lens = ("completion_len", None)
        prompts = cols["prompt_ids"]
    for name, col in zip(lens, resp):
        if name:
            cols[name] = [len(r) for r in cols[col]]
    if backend is None:
        return
    n = len(prompts)
    responses = cols[resp[0]] + cols[resp[1]]
    sums, got = backend.score(prompts + prompts, responses)
    _check_scores(sums, got, responses, cols["row_id"] * 2)
    cols[out[0]], cols[out[1]] = sums[:n], sums[n:]
    counts["tokens_scored"] += sum(len(p) for p in prompts) * 2 + sum(len(r) for r in responses)
    counts["response_tokens"] += sum(got)


def _tokenize_block(pt, records, ds, kind, seen: set | None) -> tuple[dict, TokenStats]:
    stats = TokenStats(_seen=seen if seen is not None else set())
    cols = pt.tokenize(records, stats, ds.paired)
    if kind == "unpaired":
        cols = kto_pairs.examples_from(cols, ds.paired)
    return cols, stats


def _process_block(index, records, prev_records, cfg, ds, kind, pt, backend, seen, meta, out: Path) -> dict:
    cols, stats = _tokenize_block(pt, records, ds, kind, seen)
    counts = Counter()
    if kind == "unpaired":
        previous = None
        if len(cols["row_id"]) == 1 and prev_records is not None:
            previous, _ = _tokenize_block(pt, prev_records, ds, kind, None)
        try:
            cols, kl = kto_pairs.with_partners(cols, cfg.max_length, previous)
        except ValueError:
            first = records[0]
            raise UserError(f"KTO: input block {index} (rows from {first.source} row {first.row}) has a single "
                            "usable example and no earlier example to borrow a mismatched partner from; raise "
                            "--part_rows", file=str(cfg.data))
        counts.update(kl)
    _score_block(cols, kind, backend, counts)
    d = stats.to_dict()
    part = {"index": index, **{k: d[k] for k in ("rows_read", "rows_kept", "rows_skipped", "prompt_truncated",
                                                  "response_truncated", "duplicates")},
            "skipped": d["skipped"], "skip_records": stats.skip_records, "rows_written": len(cols["row_id"]),
            **{k: int(counts[k]) for k in ("tokens_scored", "response_tokens", "kl_truncated", "kl_borrowed")}}
    write_part(out / part_name(index), cols, kind, {**meta, "created_at": _now(), "part": part},
               with_reference=not cfg.no_reference)
    return part


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
        raise UserError(f"no rows left to write: all {counts['rows_read']} rows were skipped "
                        f"({', '.join(f'{k}: {v}' for k, v in counts['skipped'].items())})", file=meta["data"]["path"])
    write_manifest(out, {**meta, "created_at": _now(), "counts": counts},
                   [{"file": part_name(i), "rows": parts[i]["rows_written"]} for i in range(n_parts)])
    return counts


def run_precompute(cfg: PrecomputeConfig) -> dict:
    """Write the cache at `cfg.out` and return a summary dict (the manifest's counts plus this run's timing)."""
    from tqdm import tqdm

    from prefpipe.data.fingerprint import resolve_model_dir
    from prefpipe.data.tokenize import PairTokenizer
    from prefpipe.modeling import load_tokenizer, quiet_transformers

    t0 = time.perf_counter()
    quiet_transformers()
    if cfg.part_rows < 1:
        raise UserError(f"--part_rows must be positive (got {cfg.part_rows})")
    if cfg.overwrite and cfg.shard:
        raise UserError("--overwrite cannot be combined with --shard: one shard would delete another's parts")
    procs = _procs(cfg.shard)
    if cfg.verify and importlib.util.find_spec("prefpipe.precompute.verify") is None:
        raise UserError("--verify needs prefpipe.precompute.verify, which this install lacks")

    ds = Dataset(cfg.data, cfg.columns, turn_marker=cfg.turn_marker, batch_rows=cfg.part_rows)
    kind = "unpaired" if (cfg.kto or not ds.paired) else "paired"
    if cfg.no_reference and kind == "unpaired":
        raise UserError("--no_reference writes an ORPO cache of pairs; KTO (--kto or unpaired data) needs "
                        "reference log-probs", file=str(cfg.data))
    pt = PairTokenizer(load_tokenizer(str(resolve_model_dir(cfg.model))), cfg.settings())
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError("--out exists and is not a directory", file=str(out))
    backend = None if cfg.no_reference else make_backend(cfg.backend, cfg.backend_options(_device_for(cfg, procs)))
    try:
        meta = _run_metadata(cfg, ds, kind, pt.tok, backend)
        identity = _identity(meta)
        if procs.leader:
            out.mkdir(parents=True, exist_ok=True)
            if not procs.joined and not procs.sharded:
                _clean(out, parts=cfg.overwrite)
            elif cfg.overwrite:
                _clean(out, parts=True)
        procs.gather(None)  # the leader has prepared --out
        done = _scan_parts(out, identity)

        from prefpipe.precompute.progress import rows_to_process
        show = cfg.progress and procs.leader
        bar = tqdm(total=rows_to_process(ds.sources, cfg.part_rows, procs.owns) if show else None, disable=not show,
                   unit="row", dynamic_ncols=True, mininterval=0.5, desc="precompute")
        tokens, t_scoring = [0], time.perf_counter()

        def on_progress(_seqs, n_tokens):
            tokens[0] += n_tokens
            rate = tokens[0] / max(time.perf_counter() - t_scoring, 1e-9)
            bar.set_postfix_str(f"{tokens[0]:,} tok, {rate:,.0f} tok/s", refresh=False)
        if backend is not None and hasattr(backend, "set_progress"):
            backend.set_progress(on_progress)

        seen: set[str] = set()
        prev_records = None
        n_parts, written, reused, failure = 0, {}, 0, None
        run_counts = Counter()
        try:
            for index, records in enumerate(ds.batches()):
                n_parts += 1
                if procs.owns(index) and index not in done:
                    part = _process_block(index, records, prev_records, cfg, ds, kind, pt, backend, seen, meta, out)
                    written[index] = part
                    run_counts["tokens_scored"] += part["tokens_scored"]
                    if not hasattr(backend, "set_progress"):
                        on_progress(0, part["tokens_scored"])
                else:
                    seen.update(r.content_hash for r in records)
                    reused += procs.owns(index)
                if procs.owns(index):
                    bar.update(len(records))
                prev_records = records
        except Exception as e:  # noqa: BLE001 - peers must learn of it before they wait on the manifest
            failure = e
        bar.close()
        _agree(procs, failure)
        tokens_this_run = sum(procs.gather(run_counts["tokens_scored"]))
        parts_written = sum(procs.gather(len(written)))
        reused = sum(procs.gather(reused))
    finally:
        if backend is not None:
            backend.close()

    counts, failure = None, None
    if procs.leader or procs.sharded:
        try:
            parts = {**_scan_parts(out, identity), **written}
            missing = [i for i in range(n_parts) if i not in parts]
            if not missing:
                counts = _finalise(out, meta, n_parts, parts)
            elif not procs.sharded:
                raise RuntimeError(f"parts {missing[:5]} are missing after every process finished")
        except Exception as e:  # noqa: BLE001
            failure = e
    _agree(procs, failure)  # nobody returns before the manifest exists
    finalised = (out / MANIFEST).exists() and (not procs.sharded or counts is not None or
                                                 all(i in _scan_parts(out, identity) for i in range(n_parts)))
    if finalised and counts is None:
        counts = read_manifest(out)["metadata"]["counts"]

    wall = time.perf_counter() - t0
    summary = {"cache": str(out), "leader": procs.leader, "finalised": finalised, "kind": kind,
               "has_reference": not cfg.no_reference, "counts": counts, "parts": n_parts,
               "parts_written": parts_written, "parts_reused": reused, "tokens_this_run": tokens_this_run,
               "wall_s": wall, "tokens_per_s": tokens_this_run / wall if wall > 0 else 0.0,
               "skip_examples": _first_skips(out, n_parts) if finalised else {}}
    if cfg.verify and finalised and procs.leader:
        from prefpipe.precompute.verify import verify_cache
        summary["verify"] = verify_cache(str(out), cfg.model, cfg.verify, device=cfg.device)
    return summary


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
