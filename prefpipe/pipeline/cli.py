"""CLI: `prefpipe pipeline`, `prefpipe eval`, `prefpipe report` and `prefpipe demo`."""

from __future__ import annotations

import json
import sys

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


@click.command("eval")
@click.option("--model", "run", required=True, metavar="RUN",
              help="A run directory from `prefpipe train` (uses RUN/final and its beta) or a model directory.")
@click.option("--cache", default=None, help="Held-out paired cache: implicit-reward accuracy and margin.")
@click.option("--gen", "gen_file", default=None, metavar="GSM8K_STYLE.jsonl",
              help="Questions with GSM8K answers ('#### N'): greedy exact-match accuracy.")
@click.option("--beta", type=float, default=None, help="--cache with a plain model directory: the beta to use.")
@click.option("--out", default=None, help="Directory for eval_pref.json / eval_gen.json(l) [default: RUN].")
@click.option("--prompt_template", default="Question: {question}\nAnswer: ", show_default=True,
              help="How a question becomes a prompt.")
@click.option("--chat", is_flag=True, help="Render each question as a user turn with the chat template instead.")
@click.option("--max_new_tokens", type=int, default=256, show_default=True)
@click.option("--batch_size", type=int, default=64, show_default=True,
              help="Questions per generate() call; pairs per forward with --cache.")
@click.option("--engine", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True,
              help="auto: vLLM when it is installed and CUDA is present, else transformers.")
@click.option("--limit", type=int, default=None, help="Only the first N questions.")
@click.option("--question_col", default="question", show_default=True)
@click.option("--answer_col", default="answer", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True)
def eval_cmd(run, cache, gen_file, beta, out, prompt_template, chat, max_new_tokens, batch_size, engine, limit,
             question_col, answer_col, device, dtype):
    """Evaluate a trained policy: held-out implicit rewards (--cache) and/or downstream accuracy (--gen)."""
    from pathlib import Path

    from prefpipe.errors import UserError
    from prefpipe.pipeline.evaluate import (PREF_FILE, GenSettings, atomic_write_text, eval_generation,
                                            eval_preference, resolve_run)

    if not cache and not gen_file:
        raise UserError("give --cache (held-out pairs) and/or --gen (GSM8K-style questions)")
    r = resolve_run(run)
    if cache:
        res = eval_preference(r, cache, beta=beta, batch_size=batch_size, device=device, dtype=dtype)
        dest = Path(out) if out else r.path
        dest.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest / PREF_FILE, json.dumps(res, indent=2))
        click.echo(f"{r.name}: held-out reward accuracy {res['acc']:.4f}, margin {res['margin']:.4f} "
                   f"(beta {res['beta']:g}, {res['rows']} pairs) -> {dest / PREF_FILE}")
    if gen_file:
        s = GenSettings(prompt_template=prompt_template, chat=chat, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, engine=engine, limit=limit, question_col=question_col,
                        answer_col=answer_col, device=device, dtype=dtype)
        res = eval_generation(r, gen_file, s, out)
        click.echo(f"{r.name}: downstream exact-match accuracy {res['accuracy']:.4f} ({res['correct']}/{res['n']}; "
                   f"answers by marker {res['extraction']['marker']}, by last number "
                   f"{res['extraction']['last_number']}, none {res['extraction']['none']})")


@click.command()
@click.argument("runs_dir")
def report(runs_dir):
    """Write curves.png, beta.png and summary.md for every run in RUNS_DIR."""
    from prefpipe.pipeline.report import write_report

    res = write_report(runs_dir)
    click.echo(res["markdown"])
    click.echo(f"wrote {res['curves']}, {res['beta']}, {res['summary']}")


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
    from prefpipe.pipeline.demo import DemoSettings, run_demo

    run_demo(DemoSettings(out=out, seed=seed, fresh=fresh), log=lambda m: click.echo(f"prefpipe demo: {m}",
                                                                                     err=True))
    sys.stdout.flush()


commands = [pipeline, eval_cmd, report, demo]
