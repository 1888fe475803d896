"""`prefpipe data check`'s options, and the declaration of `--turn_marker` that precompute and train reuse."""

from __future__ import annotations

from dataclasses import dataclass

from prefpipe.data.formats import DEFAULT_SPLIT, DEFAULT_TURN_MARKER, Columns
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.options import group, opt, same_as


@dataclass(frozen=True)
class CheckSettings:
    """What `prefpipe data check DATA` reads and tokenizes the way precompute and train would."""
    model: str = opt(help="Model or tokenizer directory (or hub id) whose tokenizer to use.", path=True)
    data_split: str = opt(DEFAULT_SPLIT, help="Hugging Face datasets (a save_to_disk directory, a dataset "
                          "repository folder, a cached hub id): the split to read.")
    data_config: str | None = opt(None, help="Hugging Face datasets: the configuration (subset) to read.")
    columns: Columns = group(Columns)
    turn_marker: str = opt(DEFAULT_TURN_MARKER, escapes=True,
                           help="Implicit-prompt transcripts: the prompt ends after the last shared marker.")
    max_length: int = same_as(TokenizeSettings, "max_length")
    max_prompt_length: int | None = same_as(TokenizeSettings, "max_prompt_length")
    chat_date: str = same_as(TokenizeSettings, "chat_date")

    def tokenize_settings(self) -> TokenizeSettings:
        return TokenizeSettings(self.max_length, self.max_prompt_length, self.chat_date)
