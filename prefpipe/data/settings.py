"""`prefpipe data check`'s options, and the declaration of `--turn_marker` that precompute and train reuse."""

from __future__ import annotations

from dataclasses import dataclass

from prefpipe.data.formats import DEFAULT_TURN_MARKER, Columns
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.options import group, opt, same_as


@dataclass(frozen=True)
class CheckSettings:
    """What `prefpipe data check DATA` reads and tokenizes the way precompute and train would."""
    model: str = opt(help="Model or tokenizer directory (or hub id) whose tokenizer to use.", path=True)
    columns: Columns = group(Columns)
    turn_marker: str = opt(DEFAULT_TURN_MARKER,
                           help="Implicit-prompt transcripts: the prompt ends after the last shared marker.")
    max_length: int = same_as(TokenizeSettings, "max_length")
    max_prompt_length: int | None = same_as(TokenizeSettings, "max_prompt_length")

    def tokenize_settings(self) -> TokenizeSettings:
        return TokenizeSettings(self.max_length, self.max_prompt_length)
