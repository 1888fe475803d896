"""How user-facing messages word counts and suggestions, so that every message words them the same way."""

from __future__ import annotations

import difflib


def plural(n: int, noun: str, many: str | None = None) -> str:
    """`1 part`, `2 parts`, `0 parts`; `many` for an irregular plural (`plural(n, "entry", "entries")`)."""
    return f"{n} {noun if n == 1 else (many or noun + 's')}"


def did_you_mean(name, candidates) -> str:
    """` (did you mean 'x'?)` for the candidate closest to `name` (difflib's ratio >= 0.6), or `""`."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
