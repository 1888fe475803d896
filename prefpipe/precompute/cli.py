"""CLI for phase one: `prefpipe precompute` and `prefpipe inspect`. Every precompute option is a field of
`PrecomputeConfig` (prefpipe.precompute.config)."""

from __future__ import annotations

import click

from prefpipe.options import build, cli_options, from_cli, options
from prefpipe.precompute.config import PrecomputeConfig
from prefpipe.precompute.report import format_summary, inspect_lines

OPTIONS = options(PrecomputeConfig)


@click.command()
@cli_options(OPTIONS)
def precompute(**kwargs):
    """Phase one: score every example with the frozen SFT model into a Parquet cache.

    Rerunning the same command after an interruption continues from the finished parts. Under
    `torchrun --nproc_per_node=N` each rank scores its share of the parts and rank 0 writes the manifest. With
    `--engine ray` a pool of Ray actors, on any number of nodes, scores and writes them (docs/ray.md).
    """
    cfg = build(PrecomputeConfig, from_cli(OPTIONS, kwargs))  # a bad option stops here, before torch is imported
    from prefpipe.precompute.run import run_precompute  # pyarrow, torch once it runs: keeps --help fast

    summary = run_precompute(cfg)
    if summary.get("leader", True):
        for line in format_summary(summary):
            click.echo(line)


@click.command("inspect")
@click.argument("cache")
def inspect_cmd(cache):
    """Print a cache's provenance and column statistics (validates every part on the way)."""
    from prefpipe.data.cache import read_cache  # pyarrow: keeps --help fast

    for line in inspect_lines(read_cache(cache, memory_map=True)):
        click.echo(line)
