"""Click options shared by every command that reads preference data."""

from __future__ import annotations

import click

from prefpipe.data.formats import DEFAULT_TURN_MARKER, Columns
from prefpipe.data.tokenize import TokenizeSettings


def data_options(f):
    """--prompt_col ... --label_col and --turn_marker."""
    opts = [
        click.option("--prompt_col", default="prompt", show_default=True, help="Column holding the prompt."),
        click.option("--chosen_col", default="chosen", show_default=True, help="Column holding the chosen response."),
        click.option("--rejected_col", default="rejected", show_default=True,
                     help="Column holding the rejected response."),
        click.option("--completion_col", default="completion", show_default=True,
                     help="Unpaired (KTO) data: column holding the completion."),
        click.option("--label_col", default="label", show_default=True,
                     help="Unpaired (KTO) data: boolean column, true = desirable."),
        click.option("--turn_marker", default=DEFAULT_TURN_MARKER, show_default=True,
                     help="Implicit-prompt transcripts: the prompt ends after the last shared marker."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def tokenize_options(f):
    f = click.option("--max_prompt_length", type=int, default=TokenizeSettings.max_prompt_length, show_default=True,
                     help="Prompt token budget; longer prompts lose their beginning.")(f)
    f = click.option("--max_length", type=int, default=TokenizeSettings.max_length, show_default=True,
                     help="Total token budget per sequence; longer responses lose their end.")(f)
    return f


def columns_from(kw: dict) -> Columns:
    return Columns(prompt=kw.pop("prompt_col"), chosen=kw.pop("chosen_col"), rejected=kw.pop("rejected_col"),
                   completion=kw.pop("completion_col"), label=kw.pop("label_col"))
