"""The demo's task: single-digit addition and subtraction word problems in GSM8K's format.

Each row is ``{"question": ..., "answer": "#### 12"}``: the final number after ``#### ``, exactly as GSM8K writes
it, with no working line. The working is left out on purpose. With ``7 + 5 = 12\\n#### 12`` (or ``7 + 5\\n#### 12``)
a partly trained model wrote its working and its final number almost independently, so on-policy pairs judged by
the final number rewarded wrong workings: measured at temperature 1, about 1 chosen answer in 7 was right
throughout, and DPO on those pairs lowered held-out accuracy at every learning rate and beta tried. With the number
alone, a pair says exactly one thing: this number, not that one.

Single digits keep the task learnable by a 0.5M-parameter model in a minute or two of CPU time (two-digit problems
stay near chance at this size), while leaving it only partly right, so that preference training has something to
fix.

Train and held-out questions are disjoint as texts (every question is generated once, then split), but they share
templates, names and number facts: the held-out set measures whether the model reads and computes, not whether it
memorised a question.
"""

from __future__ import annotations

import itertools
import random

NAMES = ["Ann", "Ben", "Cat", "Dan", "Eva", "Max", "Mia", "Sam", "Tom", "Zoe"]
ITEMS = ["apples", "books", "cards", "coins", "eggs", "pens", "shells", "stamps"]

# (template, operation). {n}: name, {a}/{b}: operands, {i}: item.
TEMPLATES = [
    ("{n} has {a} {i} and gets {b} more. How many now?", "+"),
    ("{n} had {a} {i} and found {b}. How many now?", "+"),
    ("A box has {a} {i}. {n} adds {b}. How many now?", "+"),
    ("{n} has {a} {i} and gives {b} away. How many left?", "-"),
    ("{n} had {a} {i} and lost {b}. How many left?", "-"),
    ("A box has {a} {i}. {n} takes {b}. How many left?", "-"),
]

PROMPT_TEMPLATE = "Q: {question}\nA: "


def make_problem(template: str, op: str, name: str, item: str, a: int, b: int) -> dict:
    question = template.format(n=name, a=a, b=b, i=item)
    c = a + b if op == "+" else a - b
    return {"question": question, "answer": f"#### {c}"}


def all_problems() -> list[dict]:
    """Every distinct problem: subtraction only where the result is not negative."""
    rows = []
    for (template, op), name, item, a, b in itertools.product(TEMPLATES, NAMES, ITEMS, range(10), range(10)):
        if op == "-" and b > a:
            continue
        rows.append(make_problem(template, op, name, item, a, b))
    return rows


def make_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint random train and held-out sets of distinct questions."""
    rows = all_problems()
    if n_train + n_heldout > len(rows):
        raise ValueError(f"only {len(rows)} distinct problems exist; asked for {n_train} + {n_heldout}")
    random.Random(seed).shuffle(rows)
    return rows[:n_train], rows[n_train:n_train + n_heldout]


def corpus(rows: list[dict]) -> list[str]:
    """Every text the demo's tokenizer must cover."""
    return [PROMPT_TEMPLATE.format(question=r["question"]) + r["answer"] for r in rows]
