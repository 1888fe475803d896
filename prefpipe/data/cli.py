"""`prefpipe data check`: what prefpipe will make of a dataset, before any compute is spent on it."""

from __future__ import annotations

from collections import Counter

import click

from prefpipe.data.kto_pairs import kto_balancing_weight
from prefpipe.data.settings import CheckSettings
from prefpipe.data.tokenize import SKIP_REASONS, PairTokenizer, TokenStats
from prefpipe.options import build, cli_options, from_cli, options
from prefpipe.tokenizer import load_tokenizer, quiet_transformers, tokenizer_only_process
from prefpipe.wording import plural

OPTIONS = options(CheckSettings)


@click.group()
def data():
    """Inspect preference data."""


def _quantiles(hist: dict[int, int]) -> str:
    """min, median, p95, max of the values a histogram {value: count} holds, by nearest rank."""
    if not hist:
        return "-"
    values = sorted(hist)
    n = sum(hist.values())

    def q(f):  # the value at 0-based rank round(f * (n - 1)) of the sorted values
        rank, seen = min(n - 1, max(0, int(round(f * (n - 1))))), 0
        for v in values:
            seen += hist[v]
            if seen > rank:
                return v
    return f"{values[0]:>6} {q(0.5):>7} {q(0.95):>6} {values[-1]:>6}"


@data.command("check")
@click.argument("data_path", metavar="DATA")
@cli_options(OPTIONS)
@click.pass_context
def check(ctx, data_path, **kwargs):
    """Detect DATA's format, tokenize it, and report lengths, truncation, skips and duplicates."""
    s = build(CheckSettings, from_cli(OPTIONS, kwargs))
    if (ctx.obj or {}).get("own_process"):
        tokenizer_only_process()  # no model is loaded here: transformers need not import torch
    settings = s.input.tokenize_settings()
    max_length, max_prompt_length = settings.max_length, settings.max_prompt_length
    quiet_transformers()
    ds = s.input.dataset(data_path)
    ds.validate()  # every bad row at once, as precompute and train report them
    pt = PairTokenizer(load_tokenizer(s.model), settings)
    ds.check_tokenizer(pt.tok)
    # Memory stays flat in the rows: lengths are histograms, labels counts, and skips only the first per reason.
    stats = TokenStats(keep_lengths=True)
    examples, labels = {}, Counter()
    for batch in ds.batches():
        cols = pt.tokenize(batch, stats, ds.paired)
        labels.update(bool(x) for x in cols.get("label", []))
        stats.skip_records = list({r["reason"]: r for r in reversed(stats.skip_records)}.values())
        for rec in batch:
            examples.setdefault(_shape(rec), rec)
    what = f"a prefpipe generate output, its {'KTO view' if ds.kto_view else 'pairs'}" if ds.generated else \
        plural(len(ds.sources), 'file')
    click.echo(f"data:       {data_path} ({what})")
    for f in ds.skipped_files:
        click.echo(f"            skipped {f} (not a data file)")
    click.echo(f"format:     {ds.format}")
    click.echo(f"rows:       {stats.rows_read} read, {stats.rows_kept} kept, {sum(stats.skipped.values())} skipped")
    click.echo(f"truncated:  {plural(stats.prompt_truncated, 'prompt')} (from the left), "
               f"{plural(stats.response_truncated, 'row')} with a response cut (from the right); "
               f"max_length={max_length}, max_prompt_length={max_prompt_length}")
    repeat = "row repeats" if stats.duplicates == 1 else "rows repeat"
    click.echo(f"duplicates: {stats.duplicates} {repeat} an earlier row's content (kept)")
    click.echo("token lengths:")
    click.echo(f"  {'':10} {'min':>6} {'median':>7} {'p95':>6} {'max':>6}")
    for name in ("prompt", "chosen", "rejected", "completion"):
        if name in stats.lengths:
            click.echo(f"  {name:10} {_quantiles(stats.lengths[name])}")
    if labels:
        _label_balance(labels[True], labels[False])
    for shape, rec in examples.items():
        _show_example(pt, rec, shape, ds.paired)
    if stats.skipped:
        click.echo("skipped:")
        for reason, n in sorted(stats.skipped.items()):
            first = next(r for r in stats.skip_records if r["reason"] == reason)
            click.echo(f"  {n:>6}  {reason}: {SKIP_REASONS[reason]} (first: {first['source']} row {first['row']})")


def _shape(rec) -> str:
    return "conversational" if isinstance(rec.prompt, list) else "plain text"


def _visible(text: str) -> str:
    return text.replace("\n", "\\n")


def _label_balance(n_d: int, n_u: int):
    """KTO's desirable/undesirable counts and the --desirable_weight that balances them."""
    line = f"labels:     {n_d} desirable, {n_u} undesirable"
    if n_d and n_u:
        line += (f" (ratio {n_d / n_u:.2f}); --desirable_weight {kto_balancing_weight(n_d, n_u)} balances them "
                 "(KTO paper: lambda_D*n_D/(lambda_U*n_U) in [1, 4/3])")
    else:
        line += "; KTO needs both kinds"
    click.echo(line)


def _joined(tok, prompt_ids: list[int], response_ids: list[int]) -> str:
    """The decode of prompt + response ids as one sequence (what the model sees: decoding them apart would hide a
    token that carries a leading space), with ⟦|⟧ where the response's ids start."""
    full = tok.decode(prompt_ids + response_ids, skip_special_tokens=False)
    head = tok.decode(prompt_ids, skip_special_tokens=False)
    # A decoder strips the leading space of a sequence's first token, so the prompt's own decode is a prefix of
    # the joined one; when a decoder does not work that way, the marker is left out rather than misplaced.
    if full.startswith(head):
        return _visible(head) + "⟦|⟧" + _visible(full[len(head):])
    return _visible(full)


def _show_example(pt, rec, shape: str, paired: bool):
    """One kept row of a shape as the model will see it: decoded ids (special tokens shown), ⟦prompt⟧ before the
    prompt and ⟦|⟧ where the response starts."""
    cols = pt.tokenize([rec], TokenStats(), paired)
    if not cols["row_id"]:
        return  # skipped: the skip report names it
    click.echo(f"example ({shape}, {rec.source} row {rec.row}; \\n is a newline):")
    for name in ("chosen", "rejected") if paired else ("completion",):
        click.echo(f"  {name + ':':11} ⟦prompt⟧{_joined(pt.tok, cols['prompt_ids'][0], cols[name + '_ids'][0])}")
    if shape == "plain text":
        click.echo("  plain-text prompt and response are joined with no separator: the model sees exactly "
                   "prompt+response, so end each prompt with its own separator (a newline or a space)")
