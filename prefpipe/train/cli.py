"""`prefpipe train`: phase two from the command line. The work is `prefpipe.train.loop.run_training`; every option
is a field of `TrainConfig` (prefpipe.train.config)."""

from __future__ import annotations

import click

from prefpipe.options import build, cli_options, from_cli, options
from prefpipe.train.config import TrainConfig
from prefpipe.train.sweep_table import format_summary

OPTIONS = options(TrainConfig)


@click.command()
@cli_options(OPTIONS)
def train(**kwargs):
    """Phase two: train the policy against the cached reference log-probs.

    \b
    prefpipe train --model SFT --cache CACHE --loss_type dpo --beta 0.1 --beta 0.3 --out RUNS
    prefpipe train --model SFT --data pairs.jsonl --loss_type orpo --out RUNS
    torchrun --nproc_per_node=2 -m prefpipe train ...   (data-parallel; add --fsdp to shard)
    """
    import os

    cfg = build(TrainConfig, from_cli(OPTIONS, kwargs))  # a bad option stops here, before torch is imported
    from prefpipe.train.loop import run_training

    summary = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(format_summary(summary))
