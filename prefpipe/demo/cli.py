"""CLI: `prefpipe demo`."""

from __future__ import annotations

import sys

import click


@click.command()
@click.option("--out", default="prefpipe-demo", show_default=True, help="Everything the demo makes goes here.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the task split, the SFT model, the samples and training.")
@click.option("--fresh", is_flag=True, help="Rebuild the SFT model and the pairs even when cached.")
def demo(out, seed, fresh):
    """The whole job offline on CPU: task, SFT model, on-policy pairs, pipeline, evaluation, report.

    About 2 minutes on 2 CPU cores the first time; a rerun reuses the SFT model, the pairs and the cache and
    takes about 1 minute (training and evaluation only).
    """
    from prefpipe.demo.run import DemoSettings, run_demo

    run_demo(DemoSettings(out=out, seed=seed, fresh=fresh), log=lambda m: click.echo(f"prefpipe demo: {m}",
                                                                                     err=True))
    sys.stdout.flush()


commands = [demo]
