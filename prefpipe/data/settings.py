"""How data is read and tokenized (`InputSettings`, the group precompute, train and `data check` share), and
`prefpipe data check`'s options."""

from __future__ import annotations

from dataclasses import dataclass

from prefpipe.data.formats import DEFAULT_TURN_MARKER, Columns, Dataset
from prefpipe.data.sources import DEFAULT_SPLIT
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.options import group, opt, same_as


@dataclass(frozen=True)
class InputSettings:
    """The input options every command that reads preference data takes: which split and columns, the turn
    marker, and the tokenization budgets and chat date. A group (`prefpipe.options.group`), so its options keep
    their own names in every command and TOML table. `max_prompt_length` is resolved to an integer on
    construction (None: half of `max_length`), which the cache metadata records."""
    data_split: str = opt(DEFAULT_SPLIT, help="Hugging Face datasets (a save_to_disk directory, a dataset "
                          "repository folder, a cached hub id): the split to read.")
    data_config: str | None = opt(None, help="Hugging Face datasets: the configuration (subset) to read.")
    columns: Columns = group(Columns)
    turn_marker: str = opt(DEFAULT_TURN_MARKER, escapes=True,
                           help="Implicit-prompt transcripts: the prompt ends after the last shared marker.")
    max_length: int = same_as(TokenizeSettings, "max_length")
    max_prompt_length: int | None = same_as(TokenizeSettings, "max_prompt_length")
    chat_date: str = same_as(TokenizeSettings, "chat_date")

    def __post_init__(self):
        # TokenizeSettings' checks name the option (--max_length, key 'max_length'): the field names are the same.
        object.__setattr__(self, "max_prompt_length", self.tokenize_settings().max_prompt_length)

    def tokenize_settings(self) -> TokenizeSettings:
        return TokenizeSettings(self.max_length, self.max_prompt_length, self.chat_date)

    def dataset(self, data, **kw):
        """`data` read with these settings (`kw`: Dataset's other arguments, such as `batch_rows`)."""
        return Dataset(data, self.columns, turn_marker=self.turn_marker, split=self.data_split,
                       config=self.data_config, **kw)


@dataclass(frozen=True)
class CheckSettings:
    """What `prefpipe data check DATA` reads and tokenizes the way precompute and train would."""
    model: str = opt(help="Model or tokenizer directory (or hub id) whose tokenizer to use.", path=True)
    input: InputSettings = group(InputSettings)
