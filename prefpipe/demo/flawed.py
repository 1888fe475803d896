"""`prefpipe demo --task flawed`'s task: the demo's add/sub problems, with demonstrations that are wrong on carries.

Why this task. On the default demo every demonstration is right, so more supervised learning on it is the best use
of a step and preference training has nothing to add (docs/demo.md). Preference rounds earn their keep where the
demonstrations are imperfect but a checker is exact. Here:

- **Demonstrations** (the training split's ``answer``): on additions with a carry (a + b >= 10) a fixed share
  `flaw_rate` of them drop the carry (``7 + 5`` is demonstrated as ``#### 2``, not ``#### 12``); every other
  demonstration is right. The flawed rows are chosen by the seed, exactly ``round(flaw_rate * carries)`` of them,
  so the realised rate is the asked-for one up to rounding.
- **The checker** knows the true answer (each row's ``true_answer``): a sample is right when its final number
  (prefpipe.answers) is the true sum.
- **Held-out** rows are judged against true answers: their ``answer`` *is* the true answer (no flaw there).

With flaw_rate > 1/2 a model that imitates the demonstrations well answers carries wrongly when it decodes
greedily (the dropped carry is the majority answer) but rightly in about 1 - flaw_rate of its samples at
temperature 1. More SFT on the demonstrations cannot fix that (the demonstrations *are* the error); sampling and
checking can: the right carry answer is there to be chosen, the dropped carry to be rejected.

Dropping the carry is a single token's decision: ``#### 12`` and ``#### 2`` differ in whether the first digit is
the carry, so a pair says exactly "write the carry".
"""

from __future__ import annotations

import itertools
import random

from prefpipe.demo.task import ITEMS, NAMES, PROMPT_TEMPLATE, TEMPLATES


def has_carry(op: str, a: int, b: int) -> bool:
    """An addition of two digits whose sum needs a second digit."""
    return op == "+" and a + b >= 10


def dropped_carry(a: int, b: int) -> int:
    """The sum with its carry dropped: the units digit of a + b."""
    return (a + b) % 10


def all_problems() -> list[dict]:
    """Every distinct problem with its operands: question, true_answer, op, a, b, carry (the same problems, in the
    same order, as prefpipe.demo.task.all_problems)."""
    rows = []
    for (template, op), name, item, a, b in itertools.product(TEMPLATES, NAMES, ITEMS, range(10), range(10)):
        if op == "-" and b > a:
            continue
        c = a + b if op == "+" else a - b
        rows.append({"question": template.format(n=name, a=a, b=b, i=item), "true_answer": f"#### {c}",
                     "op": op, "a": a, "b": b, "carry": has_carry(op, a, b)})
    return rows


def flaw_demonstrations(rows: list[dict], flaw_rate: float, seed: int) -> list[dict]:
    """Copies of `rows` with ``answer`` (the demonstration) and ``flawed``: exactly round(flaw_rate * carries) of
    the carry rows, chosen by `seed`, demonstrate the dropped carry; the rest demonstrate the true answer."""
    if not 0.0 <= flaw_rate <= 1.0:
        raise ValueError(f"flaw_rate must be in [0, 1] (got {flaw_rate})")
    carries = [i for i, r in enumerate(rows) if r["carry"]]
    random.Random(seed).shuffle(carries)
    flawed = set(carries[:round(flaw_rate * len(carries))])
    out = []
    for i, r in enumerate(rows):
        answer = f"#### {dropped_carry(r['a'], r['b'])}" if i in flawed else r["true_answer"]
        out.append({**r, "answer": answer, "flawed": i in flawed})
    return out


def make_flawed_splits(n_train: int, n_valid: int, n_heldout: int, flaw_rate: float,
                       seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Disjoint (train, valid, heldout) sets of distinct questions.

    train and valid hold demonstrations (flawed at `flaw_rate` on carries, each split on its own so that both see
    the rate); valid is what SFT's stopping rule reads (loss on demonstrations it does not train on). heldout's
    ``answer`` is the true answer.
    """
    rows = all_problems()
    if n_train + n_valid + n_heldout > len(rows):
        raise ValueError(f"only {len(rows)} distinct problems exist; asked for {n_train} + {n_valid} + {n_heldout}")
    random.Random(seed).shuffle(rows)
    train = flaw_demonstrations(rows[:n_train], flaw_rate, seed)
    valid = flaw_demonstrations(rows[n_train:n_train + n_valid], flaw_rate, seed + 1)
    heldout = [{**r, "answer": r["true_answer"]} for r in rows[n_train + n_valid:n_train + n_valid + n_heldout]]
    return train, valid, heldout


def prompt_of(row: dict) -> str:
    return PROMPT_TEMPLATE.format(question=row["question"])
