"""The judges of `prefpipe generate`: `--reward answer`, `model` or `python:MODULE:FUNCTION` (`make_judge`).

- **answer**: 1.0 when the sample's final number (`prefpipe.answers.extract_answer`) equals the row's
  gold number, else 0.0. The gold column holds GSM8K's ``...#### 72`` (the number after the last ``####``) or a
  plain number (``72``, ``"1,234"``, ``12.5``); a gold value with no number is refused before sampling.
- **model**: a sequence-classification reward model's score of prompt + completion (`reward_model.py`).
- **python:MODULE:FUNCTION**: ``FUNCTION(prompt, completion, row)`` from MODULE, imported with the current
  directory first on the path (so ``my_judge.py`` beside the data works). It returns a bool (1.0/0.0) or a finite
  number; anything else, or an exception, stops the run with one line naming the sample. The judge is binary
  when every value it returned was a bool.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import sys

from prefpipe.data.tokenize import DEFAULT_CHAT_DATE
from prefpipe.errors import UserError
from prefpipe.answers import MARKER, extract_answer, gold_answer, normalize_number
from prefpipe.generation.judge import Judge, sample_label, short_repr
from prefpipe.generation.reward_model import RewardModelJudge
from prefpipe.generation.samples import Sample
from prefpipe.wording import did_you_mean

REWARD_KINDS = ("answer", "model", "python:MODULE:FUNCTION")


def gold_number(value) -> str | None:
    """The normalised gold number of a gold-column value (GSM8K ``#### N`` text, or a plain number), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return normalize_number(str(value)) if math.isfinite(value) else None
    if isinstance(value, str):
        return gold_answer(value) if MARKER in value else normalize_number(value)
    return None


class AnswerJudge(Judge):
    binary = True

    def __init__(self, gold_col: str = "answer"):
        self.gold_col = gold_col
        self.name = f"answer:{gold_col}"

    def _problem(self, row: dict) -> str | None:
        """Why `row` has no usable gold number, or None."""
        if row.get(self.gold_col) is None:
            return (f"no gold answer (column absent or null; the row has {', '.join(map(repr, row)) or 'no columns'})"
                    + did_you_mean(self.gold_col, row))
        if gold_number(row[self.gold_col]) is None:
            return (f"the gold answer {short_repr(row[self.gold_col])} has no number; write GSM8K's '#### N' or a "
                    f"plain number")
        return None

    def check_rows(self, rows: list[dict], where: str) -> None:
        for i, row in enumerate(rows, start=1):
            problem = self._problem(row)
            if problem:
                raise UserError(problem, file=where, row=i, column=self.gold_col)

    def score(self, samples: list[Sample]) -> None:
        for s in samples:
            problem = self._problem(s.row)
            if problem:
                raise UserError(f"{sample_label(s)}: {problem}", column=self.gold_col)
            s.reward = float(extract_answer(s.completion)[0] == gold_number(s.row[self.gold_col]))


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class PythonJudge(Judge):
    """`FUNCTION(prompt, completion, row)` from the user's MODULE (module docstring)."""

    def __init__(self, module: str, function: str):
        self.module, self.function = module, function
        self.name = f"python:{module}:{function}"
        self._fn = None
        self._returned_any = False
        self._all_bools = True

    @property
    def binary(self) -> bool:
        """True once the function has returned values and every one was a bool."""
        return self._returned_any and self._all_bools

    def load(self):
        """The user's function, imported once; `UserError` when the module or the function is not there."""
        if self._fn is not None:
            return self._fn
        cwd = os.getcwd()
        importlib.invalidate_caches()  # a module written since the last import must be found
        sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(self.module)
        except Exception as e:  # noqa: BLE001 - the user's module: whatever fails while importing it is theirs
            raise UserError(f"--reward {self.name}: cannot import module {self.module!r} (looked in {cwd} first): "
                            f"{_one_line(e)}") from None
        finally:
            if cwd in sys.path:
                sys.path.remove(cwd)  # the first entry, the one inserted above
        fn = getattr(module, self.function, None)
        if not callable(fn):
            names = [n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise UserError(f"--reward {self.name}: module {self.module!r} ({getattr(module, '__file__', '?')}) "
                            f"has no function {self.function!r}" + did_you_mean(self.function, names))
        self._fn = fn
        return fn

    def check_rows(self, rows: list[dict], where: str) -> None:
        self.load()

    def score(self, samples: list[Sample]) -> None:
        fn = self.load()
        for s in samples:
            try:
                value = fn(s.prompt, s.completion, s.row)
            except Exception as e:  # noqa: BLE001 - the user's code; its message is what they need
                raise UserError(f"--reward {self.name} raised on {sample_label(s)}: {_one_line(e)}") from None
            s.reward = self._reward(value, s)

    def _reward(self, value, s: Sample) -> float:
        is_bool = isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool too
        if is_bool:
            reward = 1.0 if value else 0.0
        elif isinstance(value, numbers.Real) and math.isfinite(value):
            reward = float(value)
        else:
            raise UserError(f"--reward {self.name} returned {short_repr(value)} on {sample_label(s)}; a judge "
                            f"function returns a bool or a finite number")
        self._returned_any = True
        self._all_bools = self._all_bools and is_bool
        return reward


def make_judge(reward: str, *, gold_col: str = "answer", reward_model: str | None = None, device: str = "cpu",
               batch_size: int = 16, chat_date: str = DEFAULT_CHAT_DATE, dtype: str = "auto") -> Judge:
    """The judge `reward` names (module docstring). Nothing is imported or loaded yet: `check_rows` imports a
    python judge's module, the first `score` loads a reward model."""
    if reward_model is not None and reward != "model":
        raise UserError(f"--reward_model is only read with --reward model (this run has --reward {reward})")
    if reward == "answer":
        return AnswerJudge(gold_col)
    if reward == "model":
        if not reward_model:
            raise UserError("--reward model needs --reward_model DIR (a sequence-classification model with one "
                            "output)")
        return RewardModelJudge(reward_model, device=device, batch_size=batch_size, chat_date=chat_date,
                                dtype=dtype)
    if reward.startswith("python:"):
        parts = reward.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise UserError(f"--reward {reward}: write python:MODULE:FUNCTION, e.g. python:my_judge:is_right")
        return PythonJudge(parts[1], parts[2])
    raise UserError(f"unknown --reward {reward!r}; choose answer, model (with --reward_model DIR) or "
                    f"python:MODULE:FUNCTION" + did_you_mean(reward, ("answer", "model")))
