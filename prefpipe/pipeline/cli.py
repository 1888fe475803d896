"""CLI for the pipeline, eval, report and demo (filled in by the pipeline issue)."""

import click


@click.command()
def pipeline():
    """Run precompute (when no valid cache exists) and every training run of a config."""
    raise click.ClickException("not implemented yet")


commands = [pipeline]
