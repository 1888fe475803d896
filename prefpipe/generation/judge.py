"""What every judge of `prefpipe generate` offers, and how its errors name a sample (the judges: `judges.py`)."""

from __future__ import annotations

from prefpipe.generation.samples import Sample


class Judge:
    """Scores samples: `score` sets each `Sample.reward` to a float.

    `name` goes into the output's provenance. `binary` is True when every reward is 0.0 or 1.0 (right/wrong), which
    picks the default pairing rule (`prefpipe.generation.pairs.default_rule`). `check_rows` looks at the input rows
    before any model is loaded, so that a missing column or a mistyped judge fails in a second, not after sampling.
    """

    name: str = ""
    binary: bool = False

    def check_rows(self, rows: list[dict], where: str) -> None:
        """Raise `UserError` (file `where`, 1-based row = position in `rows` + 1) for a row this judge cannot
        score; the default finds nothing wrong."""

    def score(self, samples: list[Sample]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the judge holds (a reward model's weights); it loads them again if asked to score."""


def sample_label(s: Sample) -> str:
    """How a message names one sample: its prompt (input position and row id) and its index among the prompt's."""
    return f"prompt {s.prompt_index} (row id {s.row_id}), sample {s.sample_index}"


def short_repr(value, limit: int = 80) -> str:
    """`repr(value)` on one line, cut to about `limit` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
