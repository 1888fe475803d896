"""CLI for `prefpipe generate`. Every option is a field of `GenerateConfig` (prefpipe.generation.config)."""

from __future__ import annotations

import click

from prefpipe.generation.config import GenerateConfig
from prefpipe.options import build, cli_options, from_cli, options

# Columns of paired and unpaired data do not apply to prompts.
OPTIONS = options(GenerateConfig, skip=("chosen_col", "rejected_col", "completion_col", "label_col",
                                        "turn_marker"))


def summary_lines(s: dict) -> list[str]:
    outcomes = ", ".join(f"{k} {v}" for k, v in s["prompt_outcomes"].items())
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(s["sample_counts"].items()))
    reward = "n/a" if s["mean_reward"] is None else f"{s['mean_reward']:.4g}"
    return [f"generate: {s['prompts']} prompts, {s['samples']} samples kept ({counts or 'all reused'}), mean "
            f"reward {reward}",
            f"pairs: {s['pairs']} ({s['pair_rule']}); prompts: {outcomes}; KTO view: {s['kto_rows']} rows",
            f"parts: {s['parts']} ({s['parts_reused']} reused); {s['seconds']} s"]


@click.command()
@cli_options(OPTIONS)
def generate(**kwargs):
    """Sample K completions per prompt, judge them, and build preference pairs (docs/generate.md).

    The output directory is a dataset: `prefpipe precompute --data OUT` reads its pairs (with the sampled token
    ids), `--kto` its KTO view. Rerunning the same command after an interruption continues from the finished parts.
    """
    cfg = build(GenerateConfig, from_cli(OPTIONS, kwargs))  # a bad option stops here, before torch is imported
    from prefpipe.generation.run import run_generate  # pyarrow and the engines: keeps --help fast

    for line in summary_lines(run_generate(cfg)):
        click.echo(line)
