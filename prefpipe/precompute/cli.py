"""CLI for phase one (filled in by the precompute issue)."""

import click


@click.command()
def precompute():
    """Phase one: score every example with the frozen SFT model into a Parquet cache."""
    raise click.ClickException("not implemented yet")


@click.command("inspect")
@click.argument("cache")
def inspect_cmd(cache):
    """Print a cache's provenance and column statistics."""
    raise click.ClickException("not implemented yet")
