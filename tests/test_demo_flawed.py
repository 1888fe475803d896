"""`prefpipe demo --task flawed`: the task's construction against hand-derived facts, the plateau rule, and a
smoke run of the command at tiny sizes (seconds) whose accuracies are recounted from the written generations."""

import json
import re

import pytest

from prefpipe.demo.flawed import all_problems, dropped_carry, flaw_demonstrations, has_carry, make_flawed_splits
from prefpipe.demo.task import all_problems as demo_problems

PLUS = ("gets", "found", "adds")
MINUS = ("gives", "lost", "takes")


def read_problem(question: str) -> tuple[str, int, int]:
    """(op, a, b) from a question's words and digits, independently of the task's code."""
    a, b = (int(x) for x in re.findall(r"\d+", question))
    words = question.replace(".", " ").replace("?", " ").split()
    op = "+" if any(w in words for w in PLUS) else "-"
    assert any(w in words for w in MINUS) == (op == "-")
    return op, a, b


def true_sum(question: str) -> int:
    op, a, b = read_problem(question)
    return a + b if op == "+" else a - b


def test_carries_by_hand():
    assert has_carry("+", 5, 5) and has_carry("+", 1, 9) and has_carry("+", 9, 9)
    assert not has_carry("+", 9, 0) and not has_carry("+", 4, 5) and not has_carry("-", 9, 9)
    assert (dropped_carry(7, 5), dropped_carry(9, 9), dropped_carry(5, 5)) == (2, 8, 0)


def test_every_problem_once_with_its_true_answer_and_carry():
    rows = all_problems()
    # 10 names x 8 items x (3 addition templates x 100 digit pairs + 3 subtraction templates x 55 pairs with b <= a)
    assert len(rows) == 80 * (3 * 100 + 3 * 55) == 37200
    # Carries: for a = 1..9 there are a values of b with a + b >= 10, so 45 of the 100 pairs; x 3 templates x 80.
    assert sum(r["carry"] for r in rows) == 80 * 3 * 45 == 10800
    assert [r["question"] for r in rows] == [r["question"] for r in demo_problems()]  # the demo's problems
    for r in rows:
        op, a, b = read_problem(r["question"])
        assert (r["op"], r["a"], r["b"]) == (op, a, b)
        assert r["true_answer"] == f"#### {true_sum(r['question'])}"
        assert r["carry"] == (op == "+" and a + b >= 10)


def test_flawed_demonstrations_drop_exactly_the_asked_share_of_carries():
    rows = all_problems()[:3000]  # the first 3000: the first 30 (name, item) blocks of the first template (all +)
    out = flaw_demonstrations(rows, 0.6, seed=4)
    carries = [r for r in out if r["carry"]]
    assert len(carries) == 30 * 45 == 1350
    assert sum(r["flawed"] for r in out) == 810  # round(0.6 x 1350), exactly
    for r in out:
        s = true_sum(r["question"])
        if r["flawed"]:
            assert r["carry"] and r["answer"] == f"#### {s - 10}"  # the carry dropped: the units digit
        else:
            assert r["answer"] == r["true_answer"] == f"#### {s}"
    assert flaw_demonstrations(rows, 0.6, seed=4) == out
    assert flaw_demonstrations(rows, 0.6, seed=5) != out
    assert sum(r["flawed"] for r in flaw_demonstrations(rows, 0.0, seed=4)) == 0
    assert sum(r["flawed"] for r in flaw_demonstrations(rows, 1.0, seed=4)) == 1350
    with pytest.raises(ValueError):
        flaw_demonstrations(rows, 1.5, seed=4)


def test_splits_flaw_the_demonstrations_only_and_are_disjoint():
    train, valid, held = make_flawed_splits(2000, 300, 400, 0.6, seed=2)
    assert (len(train), len(valid), len(held)) == (2000, 300, 400)
    qs = [{r["question"] for r in x} for x in (train, valid, held)]
    assert not (qs[0] & qs[1] or qs[0] & qs[2] or qs[1] & qs[2])
    for split in (train, valid):
        n_carry = sum(r["carry"] for r in split)
        assert sum(r["flawed"] for r in split) == round(0.6 * n_carry) > 0
    for r in held:  # held-out answers are the true ones, carries included
        assert r["answer"] == f"#### {true_sum(r['question'])}"
        assert "flawed" not in r
    assert any(r["carry"] for r in held)
    assert make_flawed_splits(2000, 300, 400, 0.6, seed=2) == (train, valid, held)
    with pytest.raises(ValueError):
        make_flawed_splits(37000, 300, 400, 0.6)
