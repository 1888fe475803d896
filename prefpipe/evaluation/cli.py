"""CLI: `prefpipe eval` and `prefpipe report`."""

from __future__ import annotations

import json

import click

from prefpipe.errors import UserError
from prefpipe.evaluation.settings import EvalTargets, GenSettings
from prefpipe.fileio import atomic_write_text, check_writable
from prefpipe.options import build, cli_options, from_cli, options
from prefpipe.rundir import RunDir


TARGETS = options(EvalTargets)
GEN = options(GenSettings)


@click.command("eval")
@cli_options(TARGETS + GEN)
def eval_cmd(**kwargs):
    """Evaluate a trained policy: held-out implicit rewards (--cache) and/or downstream accuracy (--gen)."""
    t = build(EvalTargets, from_cli(TARGETS, kwargs))  # bad options stop here, before torch is imported
    s = build(GenSettings, from_cli(GEN, kwargs))
    if not t.cache and not t.gen:
        raise UserError("give --cache (held-out pairs) and/or --gen (GSM8K-style questions)")
    from prefpipe.evaluation.evaluate import eval_generation, eval_preference, pref_line, resolve_run  # torch
    r = resolve_run(t.model)
    out = t.out if t.out else r.path
    check_writable(out, "--out" if t.out else "the results directory")  # before any model is loaded
    if t.cache:
        res = eval_preference(r, t.cache, beta=t.beta, batch_size=s.batch_size, device=s.device, dtype=s.dtype)
        dest = RunDir(out)
        dest.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest.eval_pref, json.dumps(res, indent=2))
        click.echo(f"{pref_line(res)} -> {dest.eval_pref}")
    if t.gen:
        res = eval_generation(r, t.gen, s, out)
        click.echo(f"{r.name}: downstream exact-match accuracy {res['accuracy']:.4f} ({res['correct']}/{res['n']}; "
                   f"answers by marker {res['extraction']['marker']}, by last number "
                   f"{res['extraction']['last_number']}, none {res['extraction']['none']})")


@click.command()
@click.argument("runs_dir")
def report(runs_dir):
    """Write curves.png, beta.png and summary.md for every run in RUNS_DIR."""
    from prefpipe.evaluation.report import write_report  # with plots and ranking: 10 ms more on every --help

    res = write_report(runs_dir)
    click.echo(res["markdown"])
    click.echo(f"wrote {res['curves']}, {res['beta']}, {res['summary']}")


commands = [eval_cmd, report]
