"""`Scores`, what every scoring layer returns: the torch functions of `prefpipe.logprobs`, the training
`Scorer`, `prefpipe.scoring`, the precompute backends and the helpers built on them. No torch here."""

from __future__ import annotations

from typing import Any, NamedTuple


class Scores(NamedTuple):
    """Per scored sequence, in input order: the summed log-prob of its response tokens (`sums`) and how many
    response tokens were scored (`counts`); with per-token output asked for, each sequence's per-token log-probs
    (`tokens`); and the padded per-token outputs a training forward asks for by name (`extras`, `[S, max n]`).

    In `prefpipe.logprobs` and the training `Scorer`, `sums` and `counts` are `[S]` tensors (with gradient when
    the forward has one) and `tokens` a list of `[n_i]` tensors. From `prefpipe.scoring` on they are plain
    lists (floats, ints; tokens as CPU tensors there and float lists from a backend), ready to be written."""
    sums: Any
    counts: Any
    tokens: list | None = None
    extras: dict | None = None

    def part(self, start: int, stop: int) -> Scores:
        """The sequences `start:stop` (list-valued scores: a flattened batch split back per response)."""
        return Scores(self.sums[start:stop], self.counts[start:stop],
                      None if self.tokens is None else self.tokens[start:stop])
