"""CLI: `prefpipe pipeline`."""

from __future__ import annotations

import json

import click
from click.core import ParameterSource

from prefpipe.pipeline.config import KEYS, Key


def _log(msg: str):
    click.echo(f"prefpipe pipeline: {msg}", err=True)


def _option_for(key: Key):
    shown = ", ".join(str(x) for x in key.default) if isinstance(key.default, list) else key.default
    default = f" [default: {shown}]" if key.default not in (None, [], "") else ""
    if key.kind == "bool":
        return click.option(f"--{key.name}/--no_{key.name}", default=None, help=key.help + default)
    if key.kind in ("str_list", "float_list"):
        t = click.Choice(key.choices) if key.choices else (float if key.kind == "float_list" else str)
        return click.option(f"--{key.name}", multiple=True, type=t, help=key.help + default)
    t = {"int": int, "float": float}.get(key.kind, str)
    if key.choices:
        t = click.Choice(key.choices)
    return click.option(f"--{key.name}", type=t, default=None, help=key.help + default)


def key_options(f):
    for key in reversed(KEYS):
        f = _option_for(key)(f)
    return f


def given_options(ctx: click.Context, kwargs: dict) -> dict:
    """Only the options that were typed on the command line (or set through the environment)."""
    out = {}
    for name, value in kwargs.items():
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


@click.command(context_settings={"max_content_width": 110})
@click.option("--config", "config_path", default=None, metavar="RUN.toml",
              help="TOML file with any of the options below; options given here override it.")
@key_options
@click.pass_context
def pipeline(ctx, config_path, **kwargs):
    """Precompute (only when no valid cache exists), train every (loss type, beta), evaluate, report.

    \b
    prefpipe pipeline --config run.toml
    prefpipe pipeline --config run.toml --beta 0.05 --beta 0.2 --recompute
    prefpipe demo                     (the embedded end-to-end demo)
    """
    from prefpipe.pipeline.config import resolve
    from prefpipe.pipeline.run import run_pipeline

    cfg = resolve(config_path, given_options(ctx, kwargs))
    summary = run_pipeline(cfg, log=_log)
    click.echo(json.dumps({"runs_dir": cfg.runs_dir, "best": summary["report"]["best"],
                           "timing_s": summary["timing_s"]}))


commands = [pipeline]
