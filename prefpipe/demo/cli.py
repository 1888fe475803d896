"""CLI: `prefpipe demo` (`--task addsub`, the default) and `prefpipe demo --task flawed`."""

from __future__ import annotations

import sys

import click

from prefpipe.errors import UserError

TASKS = ("addsub", "flawed")
DEFAULT_OUT = {"addsub": "prefpipe-demo", "flawed": "prefpipe-demo-flawed"}


@click.command()
@click.option("--task", type=click.Choice(TASKS), default="addsub", show_default=True,
              help="addsub: the pipeline on on-policy pairs (docs/demo.md). flawed: demonstrations that drop the "
                   "carry, an exact checker; more SFT vs RFT vs DPO vs DPO rounds (docs/demo.md, --task flawed).")
@click.option("--out", default=None, help="Everything the demo makes goes here (default: prefpipe-demo; "
              "prefpipe-demo-flawed with --task flawed).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the task split, the SFT model, the samples and training.")
@click.option("--fresh", is_flag=True, help="Rebuild the SFT model (and, for addsub, the pairs) even when cached.")
@click.option("--smoke", is_flag=True, hidden=True,
              help="flawed: tiny sizes (seconds) to check that every stage runs; the numbers mean nothing.")
def demo(task, out, seed, fresh, smoke):
    """The whole job offline on CPU: task, SFT model, on-policy pairs, pipeline, evaluation, report.

    About 2 minutes on 2 CPU cores the first time; a rerun reuses the SFT model, the pairs and the cache and
    takes about 1 minute (training and evaluation only). `--task flawed` (about 4 minutes) compares more SFT,
    RFT, one DPO round and three DPO + NLL rounds when the demonstrations are wrong on carries.
    """
    out = out or DEFAULT_OUT[task]
    log = lambda m: click.echo(f"prefpipe demo: {m}", err=True)  # noqa: E731
    if task == "flawed":
        from prefpipe.demo.flawed_run import FlawedSettings, run_flawed, smoke_settings  # torch: keeps --help fast

        s = FlawedSettings(out=out, seed=seed, fresh=fresh)
        run_flawed(smoke_settings(s) if smoke else s, log=log, show=click.echo)
    else:
        if smoke:
            raise UserError("--smoke is for --task flawed")
        from prefpipe.demo.run import DemoSettings, run_demo

        run_demo(DemoSettings(out=out, seed=seed, fresh=fresh), log=log)
    sys.stdout.flush()


commands = [demo]
