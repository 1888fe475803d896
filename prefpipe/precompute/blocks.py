"""One block of input rows becomes one cache part: tokenize it (KTO: pin each example's mismatched partner),
score every response with a backend, write the part with its counts. The local driver (`run`) and the Ray engine
(`ray_engine`, whose actors score and write) both go through here."""

from __future__ import annotations

import datetime
from collections import Counter
from pathlib import Path

from prefpipe.data import kto_pairs
from prefpipe.data.cache import KINDS, part_name, write_part
from prefpipe.data.tokenize import SeenHashes, TokenStats
from prefpipe.errors import UserError


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def part_counts(part: dict) -> dict:
    """A part's metadata entry without its skip records: what the manifest sums. The records stay in the part's
    file (the summary reads its first skip per reason from there), so a run's memory does not grow with skips."""
    return {k: v for k, v in part.items() if k != "skip_records"}


def check_scores(sums, counts, responses, row_ids, tokens=None, backend=None):
    import math
    for i, (s, c, r, rid) in enumerate(zip(sums, counts, responses, row_ids)):
        if c != len(r) or (tokens is not None and len(tokens[i]) != c):
            raise RuntimeError(f"backend scored {c} tokens of a {len(r)}-token response (row {rid})")
        if not math.isfinite(s):
            dtype = backend.provenance().get("dtype") if backend is not None else None
            fix = "" if dtype == "float32" else "; try --dtype float32"  # advice a float32 run cannot take
            raise UserError(f"the model gave a non-finite log-prob ({s}) for row {rid}{fix}")


def score_block(cols: dict, kind: str, backend, counts: Counter, per_token: bool = False, progress=None):
    """Add reference columns (or lengths only, with no backend) to `cols` in place; with `per_token` also each
    response's per-token reference log-probs (float32 lists)."""
    from prefpipe.scoring import score_cache_rows  # torch

    spec = KINDS[kind]
    for r in spec.responses:
        if r.length:
            cols[r.length] = [len(x) for x in cols[r.ids]]
    if backend is None:
        return
    # One call for every response of the block: one length-sorted set of batches, or one prompt-once pass.
    got = score_cache_rows(cols.__getitem__, kind,
                           lambda p, r: backend.score(p, r, per_token=per_token, progress=progress),
                           lambda p, a, b: backend.score_pairs(p, a, b, per_token=per_token, progress=progress))
    for r in spec.responses:
        s = got[r.name]
        check_scores(s.sums, s.counts, cols[r.ids], cols["row_id"], s.tokens, backend)
        cols[r.ref] = s.sums
        if per_token:
            cols[r.tokens] = s.tokens
    k = len(spec.responses)
    counts["tokens_scored"] += sum(len(p) for p in cols["prompt_ids"]) * k + \
        sum(len(x) for r in spec.responses for x in cols[r.ids])
    counts["response_tokens"] += sum(sum(s.counts) for s in got.values())


def tokenize_block(pt, records, ds, kind, seen: SeenHashes | None) -> tuple[dict, TokenStats]:
    stats = TokenStats(_seen=seen if seen is not None else SeenHashes())
    cols = pt.tokenize(records, stats, ds.paired)
    if kind == "unpaired":
        cols = kto_pairs.examples_from(cols, ds.paired)
    return cols, stats


def prepare_block(index, records, prev_records, cfg, ds, kind, pt, seen) -> tuple[dict, dict, Counter]:
    """Block `index` tokenized (KTO: with pinned partners), ready to score: (columns, the part's row counts,
    counts so far). Everything that depends on earlier blocks (duplicates, a borrowed KTO partner) happens here."""
    cols, stats = tokenize_block(pt, records, ds, kind, seen)
    counts = Counter()
    if kind == "unpaired":
        previous = None
        if len(cols["row_id"]) == 1 and prev_records is not None:
            previous, _ = tokenize_block(pt, prev_records, ds, kind, None)
        try:
            cols, kl = kto_pairs.with_partners(cols, cfg.input.max_length, previous)
        except ValueError:
            first = records[0]
            raise UserError(f"KTO: input block {index} (rows from {first.source} row {first.row}) has a single "
                            "usable example and no earlier example to borrow a mismatched partner from; raise "
                            "--part_rows", file=str(cfg.data))
        counts.update(kl)
    d = stats.to_dict()
    rows = {"index": index, **{k: d[k] for k in ("rows_read", "rows_kept", "rows_skipped", "prompt_truncated",
                                                  "response_truncated", "duplicates")},
            "skipped": d["skipped"], "skip_records": stats.skip_records}
    return cols, rows, counts


def write_block(cols: dict, rows: dict, counts: Counter, kind, backend, per_token: bool, with_reference: bool,
                 meta: dict, out: Path, progress=None) -> dict:
    """Score a prepared block and write it as its part; the part's metadata entry (what the manifest sums)."""
    score_block(cols, kind, backend, counts, per_token=per_token, progress=progress)
    part = {**rows, "rows_written": len(cols["row_id"]),
            **{k: int(counts[k]) for k in ("tokens_scored", "response_tokens", "kl_truncated", "kl_borrowed")}}
    write_part(out / part_name(rows["index"]), cols, kind, {**meta, "created_at": now(), "part": part},
               with_reference=with_reference, per_token=per_token)
    return part


def process_block(index, records, prev_records, cfg, ds, kind, pt, backend, seen, meta, out: Path,
                   progress=None) -> dict:
    cols, rows, counts = prepare_block(index, records, prev_records, cfg, ds, kind, pt, seen)
    return write_block(cols, rows, counts, kind, backend, cfg.per_token, not cfg.no_reference, meta, out,
                        progress)
