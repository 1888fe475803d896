"""Text for people: the end-of-run summary of `precompute` and the report of `prefpipe inspect`."""

from __future__ import annotations

import json

from prefpipe.data.tokenize import SKIP_REASONS
from prefpipe.wording import plural


def format_summary(s: dict) -> list[str]:
    lines = []
    if not s["finalised"]:
        lines.append(f"shard done: {plural(s['parts_written'], 'part')} written, {s['parts_reused']} already present; "
                     f"the manifest is written by the process that finds all {plural(s['parts'], 'part')} present")
    else:
        c = s["counts"]
        unit = "example" if s["kind"] == "unpaired" else "row"
        lines.append(f"cache:    {s['cache']} ({s['kind']}, {plural(s['parts'], 'part')}; {s['parts_written']} written "
                     f"now, {s['parts_reused']} reused)")
        lines.append(f"rows:     {c['rows_read']} read, {c['rows_kept']} kept, {plural(c['rows_written'], unit)} "
                     f"written, {c['rows_skipped']} skipped")
        for reason, n in c["skipped"].items():
            ex = s["skip_examples"].get(reason)
            where = f" (first: {ex['source']} row {ex['row']})" if ex else ""
            lines.append(f"  skipped {n:>6}  {reason}: {SKIP_REASONS.get(reason, '')}{where}")
        lines.append(f"truncated: {plural(c['prompt_truncated'], 'prompt')}, {plural(c['response_truncated'], 'row')} "
                     f"with a response cut; duplicates kept: {c['duplicates']}")
        files = s.get("skipped_files") or []
        if files:
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            lines.append(f"files:    {len(files)} not data, skipped: {shown}")
        if "kl_truncated" in c:
            lines.append(f"kto:      {plural(c['kl_truncated'], 'partner completion')} cut to fit, "
                         f"{plural(c['kl_borrowed'], 'partner')} borrowed from the previous block")
    if s["has_reference"]:
        lines.append(f"scored:   {s['tokens_this_run']:,} tokens in {s['wall_s']:.1f} s wall "
                     f"({s['tokens_per_s']:,.0f} tokens/s, load and I/O included)")
    else:
        lines.append(f"no reference: tokenized only, {s['wall_s']:.1f} s wall")
    if "verify" in s:
        lines.append("verify:   " + json.dumps(s["verify"], default=str))
    return lines


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("skipped", "columns"):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def inspect_lines(cache) -> list[str]:
    """Metadata, then per-token reference log-prob and length statistics computed with polars.

    Statistics are computed one row of the report at a time, each from one column of values built a chunk (cache
    part) at a time: the lengths from the list offsets, the reference columns as they are. The mapped pages of
    each chunk are released once it is read (`prefpipe.data.mapped.release_pages`), so a memory-mapped cache
    (`read_cache(..., memory_map=True)`) is inspected in memory that holds one statistic's values (8 bytes a row),
    never the table's token ids."""
    import numpy as np
    import pyarrow.compute as pc

    from prefpipe.data.mapped import chunks

    meta = cache.metadata
    lines = [f"cache: {cache.path}", "metadata:"]
    for k, v in _flatten(meta):
        if k.startswith("tokenizer.parts."):
            continue  # the combined tokenizer fingerprint is shown; components matter only in a mismatch
        shown = json.dumps(v) if isinstance(v, (dict, list)) or (isinstance(v, str) and not v.isprintable()) else v
        lines.append(f"  {k:32} {shown}")
    t = cache.table
    height = t.num_rows
    lines.append(f"rows: {height}")
    # Labels are the id columns' stems ("kl_completion", not the descriptor's "kl"): the report reads as before.
    resp = [(r.ids.removesuffix("_ids"), r) for r in cache.spec.responses]

    def row(label: str, names: tuple, fn) -> str:
        """`fn` of the columns `names` (an id column given as its per-row lengths), built a chunk at a time."""
        out = [np.array(fn(*[(pc.list_value_length(b.column(n)) if n.endswith("_ids") else b.column(n))
                             .to_numpy(zero_copy_only=False) for n in names]))  # a copy, see `chunks`
               for b in chunks(t, names)]
        return _stat_line(label, np.concatenate(out) if out else np.empty(0))

    header = f"  {'':24}" + "".join(f"{h:>11}" for h in ("mean", "std", "min", "median", "p95", "max"))
    lines += ["token lengths:", header]
    for name, ids in [("prompt", "prompt_ids")] + [(name, r.ids) for name, r in resp]:
        lines.append(row(name, (ids,), lambda n: n))
    if cache.has_reference and height:
        lines += ["reference log-prob per response token:", header]
        for name, r in resp:
            lines.append(row(name, (r.ref, r.ids), lambda ref, n: ref / n))
        lines += ["reference summed log-prob:", header]
        for name, r in resp:
            lines.append(row(name, (r.ref,), lambda ref: ref))
        if cache.kind == "paired":
            (a, ra), (b, rb) = resp
            lines.append(row(f"{a} - {b}", (ra.ref, rb.ref), lambda x, y: x - y))
    if cache.has_reference:
        lines += _per_token_lines(cache, t, resp, header)
    if cache.kind == "unpaired" and height:
        n_des = pc.sum(t.column("label")).as_py() or 0
        lines.append(f"labels: {n_des} desirable, {height - n_des} undesirable")
    return lines


def _stat_line(label: str, v) -> str:
    """One report row: mean, std, min, median, p95 and max (nearest rank) of the numpy array `v`, which it sorts
    in place: polars then reads each quantile off the sorted column instead of sorting a copy per quantile."""
    import polars as pl

    s = pl.Series("v", v)
    vals = [s.mean(), s.std()]
    v.sort()
    s = pl.Series("v", v).set_sorted()
    vals += [s.quantile(q, "nearest") for q in (0.0, 0.5, 0.95, 1.0)]
    return f"  {label:24}" + "".join(f"{'-' if x is None else f'{x:.4g}':>11}" for x in vals)


def _per_token_lines(cache, t, resp, header: str) -> list[str]:
    """Whether the cache holds per-token reference log-probs (`--per_token`) and, if so, the distribution of the
    single-token values and how far their float32 sums are from the float64 sum columns. One response's column
    at a time, read a chunk at a time with the mapped pages released after each: memory holds that response's
    single-token values (the quantiles need them all), not the table."""
    import numpy as np
    import polars as pl

    from prefpipe.data.mapped import chunks

    present = cache.has_per_token and all(r.tokens in t.column_names for _, r in resp)
    lines = [f"per-token reference log-probs: {'yes' if present else 'no'}"]
    if not present or not t.num_rows:
        return lines
    lines += ["reference log-prob of single tokens:", header]
    gap = 0.0
    for name, r in resp:
        tokens = []
        for b in chunks(t, (r.tokens, r.ref)):
            tokens.append(np.array(b.column(r.tokens).flatten().to_numpy(zero_copy_only=False)))  # a copy
            frame = pl.DataFrame({"tok": pl.from_arrow(b.column(r.tokens)), "ref": pl.from_arrow(b.column(r.ref))})
            chunk_gap = frame.select((pl.col("tok").cast(pl.List(pl.Float64)).list.sum() - pl.col("ref"))
                                     .abs().max()).item()
            gap = max(gap, chunk_gap or 0.0)
        lines.append(_stat_line(name, np.concatenate(tokens).astype(np.float64)))
    lines.append(f"  largest |sum of per-token values - summed column|: {gap:.3g}")
    return lines
