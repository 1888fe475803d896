"""CLI: `prefpipe pipeline`."""

from __future__ import annotations

import json

import click
from click.core import ParameterSource

from prefpipe.options import override_option
from prefpipe.pipeline.config import KEYS, resolve


def _log(msg: str):
    click.echo(f"prefpipe pipeline: {msg}", err=True)


def key_options(f):
    for key in reversed(KEYS):
        f = override_option(key.option, key.name)(f)
    return f


def given_options(ctx: click.Context, kwargs: dict) -> dict:
    """Only the options that were typed on the command line (or set through the environment)."""
    out = {}
    for name, value in kwargs.items():
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


@click.command()
@click.option("--config", "config_path", default=None, metavar="RUN.toml",
              help="TOML file with any of the options below; options given here override it.")
@key_options
@click.pass_context
def pipeline(ctx, config_path, **kwargs):
    """Precompute (only when no valid cache exists), train every (loss type, beta), evaluate, report.

    A rerun keeps the runs that finished with the same settings and continues unfinished ones from their last
    checkpoint; only runs whose settings changed are trained again.

    \b
    prefpipe pipeline --config run.toml
    prefpipe pipeline --config run.toml --beta 0.05 --beta 0.2 --recompute
    prefpipe demo                     (the embedded end-to-end demo)
    """
    cfg = resolve(config_path, given_options(ctx, kwargs))  # bad keys stop here, before torch is imported
    from prefpipe.pipeline.run import run_pipeline  # torch: not at `prefpipe --help` time

    summary = run_pipeline(cfg, log=_log)
    if "rounds" in summary:
        click.echo(json.dumps({"runs_dir": cfg.settings.runs_dir, "initial": summary["initial"],
                               "rounds": [r["eval"] for r in summary["rounds"]],
                               "final_model": summary["final_model"]}))
        return
    click.echo(json.dumps({"runs_dir": cfg.settings.runs_dir, "best": summary["report"]["best"],
                           "timing_s": summary["timing_s"]}))


commands = [pipeline]
