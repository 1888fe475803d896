"""The `prefpipe` command. Subcommands live next to the code they drive and are imported here."""

from __future__ import annotations

import sys

import click

from prefpipe import __version__
from prefpipe.data.cli import data
from prefpipe.demo.cli import commands as demo_commands
from prefpipe.errors import UserError
from prefpipe.evaluation.cli import commands as eval_commands
from prefpipe.generation.cli import generate
from prefpipe.interrupt import interrupted_message
from prefpipe.pipeline.cli import commands as pipeline_commands
from prefpipe.precompute.cli import inspect_cmd, precompute
from prefpipe.train.cli import train
from prefpipe.warn import quiet_third_party


class Group(click.Group):
    """Turns `UserError` into one line on stderr and exit status 2, never a traceback; Ctrl-C into a line that
    says where the work stopped and how to continue it, and exit status 130 (the shell's code for SIGINT)."""

    def invoke(self, ctx):
        # The subcommand's arguments, kept to re-parse its options after an interrupt (click consumes them).
        protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args  # click < 8.2
        args = [*protected, *ctx.args]
        quiet_third_party()
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"prefpipe: error: {e.format()}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            _interrupted(self, ctx, args)
            sys.exit(130)


def _interrupted(group: click.Group, ctx: click.Context, args: list[str]):
    import os

    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun one rank reports, not all of them
    try:
        name, cmd, rest = group.resolve_command(ctx, list(args))
        params = cmd.make_context(name, rest, parent=ctx, resilient_parsing=True).params
    except (click.ClickException, IndexError):
        name, params = None, {}
    lead = "\n" if sys.stderr.isatty() else ""  # a progress bar may hold the current line
    click.echo(f"{lead}prefpipe: {interrupted_message(name, params)}", err=True)


# No width cap of its own: click wraps `-h` at the terminal's width (80 columns, or $COLUMNS, without a terminal).
@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": sys.maxsize})
@click.version_option(__version__, prog_name="prefpipe")
def cli():
    """Preference optimisation (the DPO family, KTO, ORPO, SimPO, CPO and more: `train -h`, --loss_type) with
    reference log-probs precomputed once.

    \b
    Phase one:  prefpipe precompute --model SFT --data DATA --out CACHE
    Phase two:  prefpipe train --model SFT --cache CACHE --loss_type dpo --beta 0.1 --out RUNS
    Both:       prefpipe pipeline --config run.toml
    """


def _register():
    cli.add_command(data)
    cli.add_command(precompute)
    cli.add_command(inspect_cmd)
    cli.add_command(train)
    cli.add_command(generate)
    for cmd in pipeline_commands + eval_commands + demo_commands:
        cli.add_command(cmd)


_register()


def main():
    # own_process: this process is the command's alone (not a test's CliRunner), so `data check` may hide torch
    cli(prog_name="prefpipe", obj={"own_process": True})


if __name__ == "__main__":
    main()
