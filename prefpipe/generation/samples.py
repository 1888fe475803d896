"""One sampled completion and the columns a generate output stores per sample.

A sample keeps the token ids the model produced (`completion_ids`): decoding them and tokenizing the text again can
give other ids (merges across the prompt boundary, non-canonical tokenizations, special tokens), and the cache must
score, and the policy learn, the sequence the model actually produced. `finish_reason` is ``"stop"`` when the model
produced its EOS or end-of-turn token (the last id is that token) and ``"length"`` when `max_new_tokens` cut it
(then no stop token was produced and none is added).
"""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length")

# The columns of DIR/samples/part-*.parquet, in order. `row` is the prompt's input row (every column, JSON) so that
# judges see a gold answer, tests or metadata; `prompt` is the prompt as given (text, or JSON of its messages).
SAMPLE_COLUMNS = ("prompt_index", "row_id", "sample_index", "prompt", "prompt_ids", "completion",
                  "completion_ids", "finish_reason", "reward", "row")


@dataclass
class Sample:
    """One completion of one prompt. `prompt_index` is the prompt's position in input order (all sources in
    order), `row_id` its record's stable id; `reward` is filled in by the judge (None before)."""
    prompt_index: int
    row_id: str
    sample_index: int
    prompt: object  # str, or a list of messages
    prompt_ids: list[int]
    completion: str
    completion_ids: list[int]
    finish_reason: str
    row: dict = field(default_factory=dict)
    reward: float | None = None
