"""Final-number extraction for GSM8K-style answers.

GSM8K writes the gold answer after a line marker: ``...reasoning...\\n#### 72``. A model's generation is read the
same way, with one documented fallback:

1. **Marker.** The first ``####`` in the generation that is followed by a number on the same line: that number.
2. **Fallback: last number.** No marker followed by a number: the last number anywhere in the generation
   (models often end with "... so the answer is 72."). The verdict records which rule fired.
3. **None.** No number at all: no answer, counted wrong.

Numbers are compared as values after normalisation: thousands separators (``1,234``), a leading ``$``, a trailing
full stop and trailing zeros after a decimal point (``12.50`` = ``12.5``, ``12.0`` = ``12``) do not matter; signs
do (``-3`` is not ``3``). Fractions such as ``3/4`` are not numbers here (GSM8K's answers are all integers).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

MARKER = "####"
# A number: optional sign and $, digits with optional thousands commas, optional decimals. The comma groups must
# be exactly three digits, so "1,2" reads as two numbers and "1,234" as one.
_NUMBER = re.compile(r"(?<![\w./])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d/])")


def normalize_number(text: str) -> str | None:
    """Canonical string of a number (``"1,234.50"`` -> ``"1234.5"``), or None if `text` is not one."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not t:
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _numbers(text: str) -> list[str]:
    return [m.group(0) for m in _NUMBER.finditer(text)]


def extract_answer(generation: str) -> tuple[str | None, str]:
    """`(normalised number or None, rule)` where rule is ``"marker"``, ``"last_number"`` or ``"none"``."""
    pos = generation.find(MARKER)
    while pos >= 0:
        after = generation[pos + len(MARKER):]
        m = re.match(r"[ \t]*(-?\$?[\d,]*\d(?:\.\d+)?)", after)
        if m:
            value = normalize_number(m.group(1))
            if value is not None:
                return value, "marker"
        pos = generation.find(MARKER, pos + len(MARKER))
    nums = _numbers(generation)
    for raw in reversed(nums):
        value = normalize_number(raw)
        if value is not None:
            return value, "last_number"
    return None, "none"


def gold_answer(answer: str) -> str | None:
    """The gold number of a GSM8K answer field (the text after its last ``####``), or None when it has none."""
    pos = answer.rfind(MARKER)
    if pos < 0:
        return None
    words = answer[pos + len(MARKER):].split()
    return normalize_number(words[0]) if words else None
