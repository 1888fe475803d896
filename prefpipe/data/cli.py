"""`prefpipe data check`: what prefpipe will make of a dataset, before any compute is spent on it."""

from __future__ import annotations

import click

from prefpipe.data.settings import CheckSettings
from prefpipe.options import build, cli_options, from_cli, options

OPTIONS = options(CheckSettings)


@click.group()
def data():
    """Inspect preference data."""


def _quantiles(xs: list[int]) -> str:
    if not xs:
        return "-"
    s = sorted(xs)

    def q(f):  # nearest-rank quantile
        return s[min(len(s) - 1, max(0, int(round(f * (len(s) - 1)))))]
    return f"{s[0]:>6} {q(0.5):>7} {q(0.95):>6} {s[-1]:>6}"


@data.command("check")
@click.argument("data_path", metavar="DATA")
@cli_options(OPTIONS)
def check(data_path, **kwargs):
    """Detect DATA's format, tokenize it, and report lengths, truncation, skips and duplicates."""
    from prefpipe.data.formats import Dataset
    from prefpipe.data.tokenize import SKIP_REASONS, PairTokenizer, TokenStats
    from prefpipe.modeling import load_tokenizer, quiet_transformers

    s = build(CheckSettings, from_cli(OPTIONS, kwargs))
    settings = s.tokenize_settings()
    max_length, max_prompt_length = settings.max_length, settings.max_prompt_length
    quiet_transformers()
    ds = Dataset(data_path, s.columns, turn_marker=s.turn_marker, split=s.data_split, config=s.data_config)
    pt = PairTokenizer(load_tokenizer(s.model), settings)
    stats = TokenStats(keep_lengths=True)
    for batch in ds.batches():
        pt.tokenize(batch, stats, ds.paired)
    click.echo(f"data:       {data_path} ({len(ds.sources)} file{'s' if len(ds.sources) != 1 else ''})")
    click.echo(f"format:     {ds.format}")
    click.echo(f"rows:       {stats.rows_read} read, {stats.rows_kept} kept, {sum(stats.skipped.values())} skipped")
    click.echo(f"truncated:  {stats.prompt_truncated} prompts (from the left), {stats.response_truncated} rows with "
               f"a response cut (from the right); max_length={max_length}, max_prompt_length={max_prompt_length}")
    click.echo(f"duplicates: {stats.duplicates} rows repeat an earlier row's content (kept)")
    click.echo("token lengths:")
    click.echo(f"  {'':10} {'min':>6} {'median':>7} {'p95':>6} {'max':>6}")
    for name in ("prompt", "chosen", "rejected", "completion"):
        if name in stats.lengths:
            click.echo(f"  {name:10} {_quantiles(stats.lengths[name])}")
    if stats.skipped:
        click.echo("skipped:")
        for reason, n in sorted(stats.skipped.items()):
            first = next(r for r in stats.skip_records if r["reason"] == reason)
            click.echo(f"  {n:>6}  {reason}: {SKIP_REASONS[reason]} (first: {first['source']} row {first['row']})")
