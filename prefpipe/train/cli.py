"""CLI for phase two (filled in by the train issue)."""

import click


@click.command()
def train():
    """Phase two: train the policy against the cached reference log-probs."""
    raise click.ClickException("not implemented yet")
