"""CLI: `prefpipe eval` and `prefpipe report`."""

from __future__ import annotations

import json

import click


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

    from prefpipe.errors import UserError
    from prefpipe.fileio import atomic_write_text
    from prefpipe.rundir import RunDir
    from prefpipe.evaluation.evaluate import (GenSettings, eval_generation,
                                            eval_preference, resolve_run)

    if not cache and not gen_file:
        raise UserError("give --cache (held-out pairs) and/or --gen (GSM8K-style questions)")
    r = resolve_run(run)
    if cache:
        res = eval_preference(r, cache, beta=beta, batch_size=batch_size, device=device, dtype=dtype)
        dest = RunDir(out if out else r.path)
        dest.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dest.eval_pref, json.dumps(res, indent=2))
        click.echo(f"{r.name}: held-out reward accuracy {res['acc']:.4f}, margin {res['margin']:.4f} "
                   f"(beta {res['beta']:g}, {res['rows']} pairs) -> {dest.eval_pref}")
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
    from prefpipe.evaluation.report import write_report

    res = write_report(runs_dir)
    click.echo(res["markdown"])
    click.echo(f"wrote {res['curves']}, {res['beta']}, {res['summary']}")


commands = [eval_cmd, report]
