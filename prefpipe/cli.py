"""The `prefpipe` command. Subcommands live next to the code they drive and are imported here."""

from __future__ import annotations

import sys

import click

from prefpipe import __version__
from prefpipe.errors import UserError


class Group(click.Group):
    """Turns `UserError` into one line on stderr and exit status 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"prefpipe: error: {e.format()}", err=True)
            sys.exit(2)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="prefpipe")
def cli():
    """Preference optimisation (DPO, IPO, hinge, KTO, ORPO) with reference log-probs precomputed once.

    \b
    Phase one:  prefpipe precompute --model SFT --data DATA --out CACHE
    Phase two:  prefpipe train --model SFT --cache CACHE --loss_type dpo --beta 0.1 --out RUNS
    Both:       prefpipe pipeline --config run.toml
    """


def _register():
    from prefpipe.data.cli import data
    cli.add_command(data)
    from prefpipe.precompute.cli import inspect_cmd, precompute
    cli.add_command(precompute)
    cli.add_command(inspect_cmd)
    from prefpipe.train.cli import train
    cli.add_command(train)
    from prefpipe.demo.cli import commands as demo_commands
    from prefpipe.evaluation.cli import commands as eval_commands
    from prefpipe.pipeline.cli import commands as pipeline_commands
    for cmd in pipeline_commands + eval_commands + demo_commands:
        cli.add_command(cmd)


_register()


def main():
    cli(prog_name="prefpipe")


if __name__ == "__main__":
    main()
