"""Text for people: the end-of-run summary of `precompute` and the report of `prefpipe inspect`."""

from __future__ import annotations

import json

from prefpipe.data.tokenize import SKIP_REASONS


def format_summary(s: dict) -> list[str]:
    lines = []
    if not s["finalised"]:
        lines.append(f"shard done: {s['parts_written']} parts written, {s['parts_reused']} already present; "
                     f"the manifest is written by the process that finds all {s['parts']} parts present")
    else:
        c = s["counts"]
        unit = "examples" if s["kind"] == "unpaired" else "rows"
        lines.append(f"cache:    {s['cache']} ({s['kind']}, {s['parts']} parts; {s['parts_written']} written now, "
                     f"{s['parts_reused']} reused)")
        lines.append(f"rows:     {c['rows_read']} read, {c['rows_kept']} kept, {c['rows_written']} {unit} written, "
                     f"{c['rows_skipped']} skipped")
        for reason, n in c["skipped"].items():
            ex = s["skip_examples"].get(reason)
            where = f" (first: {ex['source']} row {ex['row']})" if ex else ""
            lines.append(f"  skipped {n:>6}  {reason}: {SKIP_REASONS.get(reason, '')}{where}")
        lines.append(f"truncated: {c['prompt_truncated']} prompts, {c['response_truncated']} rows with a response "
                     f"cut; duplicates kept: {c['duplicates']}")
        files = s.get("skipped_files") or []
        if files:
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            lines.append(f"files:    {len(files)} not data, skipped: {shown}")
        if "kl_truncated" in c:
            lines.append(f"kto:      {c['kl_truncated']} partner completions cut to fit, "
                         f"{c['kl_borrowed']} partners borrowed from the previous block")
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
    """Metadata, then per-token reference log-prob and length statistics computed with polars."""
    import polars as pl

    meta = cache.metadata
    lines = [f"cache: {cache.path}", "metadata:"]
    for k, v in _flatten(meta):
        if k.startswith("tokenizer.parts."):
            continue  # the combined tokenizer fingerprint is shown; components matter only in a mismatch
        shown = json.dumps(v) if isinstance(v, (dict, list)) or (isinstance(v, str) and not v.isprintable()) else v
        lines.append(f"  {k:32} {shown}")
    df = pl.from_arrow(cache.table)
    lines.append(f"rows: {df.height}")
    # Labels are the id columns' stems ("kl_completion", not the descriptor's "kl"): the report reads as before.
    resp = [(r.ids.removesuffix("_ids"), r) for r in cache.spec.responses]
    lengths = {"prompt": pl.col("prompt_ids").list.len()}
    for name, r in resp:
        lengths[name] = pl.col(r.ids).list.len()
    qs = (0.0, 0.5, 0.95, 1.0)

    def row(label: str, expr) -> str:
        vals = df.select([expr.mean().alias("mean"), expr.std().alias("std"),
                          *[expr.quantile(q, "nearest").alias(str(q)) for q in qs]]).row(0)
        return f"  {label:24}" + "".join(f"{'-' if v is None else f'{v:.4g}':>11}" for v in vals)

    header = f"  {'':24}" + "".join(f"{h:>11}" for h in ("mean", "std", "min", "median", "p95", "max"))
    lines += ["token lengths:", header]
    for name, expr in lengths.items():
        lines.append(row(name, expr))
    if cache.has_reference and df.height:
        lines += ["reference log-prob per response token:", header]
        for name, r in resp:
            lines.append(row(name, pl.col(r.ref) / pl.col(r.ids).list.len()))
        lines += ["reference summed log-prob:", header]
        for name, r in resp:
            lines.append(row(name, pl.col(r.ref)))
        if cache.kind == "paired":
            (a, ra), (b, rb) = resp
            lines.append(row(f"{a} - {b}", pl.col(ra.ref) - pl.col(rb.ref)))
    if cache.kind == "unpaired" and df.height:
        n_des = df.select(pl.col("label").sum()).item()
        lines.append(f"labels: {n_des} desirable, {df.height - n_des} undesirable")
    return lines
