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


def test_plateau_rule_stops_on_a_flat_loss_and_only_after_its_start():
    from prefpipe.demo.flawed_run import plateau_stop

    losses = iter([1.0, 0.5, 0.492, 0.495, 0.493, 0.3])
    stop = plateau_stop(lambda: next(losses), checks=3, tol=0.02)
    # Steps 10-30: no earlier check to compare with. At 40 the best of the last three, 0.492, is 51% below 1.0.
    assert [stop(s) for s in (10, 20, 30, 40)] == [None, None, None, None]
    # At 50: the best of (0.492, 0.495, 0.493) is 0.492, only 1.6% below the 0.5 before them (2% is 0.49).
    reason = stop(50)
    assert reason and "0.4920" in reason and "0.5000" in reason
    assert stop.history == [(10, 1.0), (20, 0.5), (30, 0.492), (40, 0.495), (50, 0.493)]
    late = iter([1.0, 1.0, 1.0, 1.0, 1.0])
    stop = plateau_stop(lambda: next(late), checks=2, tol=0.02, after=50)
    assert [stop(s) for s in (10, 20, 30, 40)] == [None] * 4  # flat, but judged only from step 50
    assert stop(50)


def recount(eval_rows: list[dict]) -> float:
    """Accuracy from the written generations, judged here: the integer after the first '####' that has one (else
    the last integer) against the true answer computed from the question's own words."""
    right = 0
    for r in eval_rows:
        g = r["generation"]
        m = re.search(r"####[ \t]*(-?\d+)", g)
        nums = re.findall(r"-?\d+", g)
        pred = int(m.group(1)) if m else (int(nums[-1]) if nums else None)
        right += pred == true_sum(r["question"])
    return right / len(eval_rows)


def test_demo_task_flawed_smoke_run_writes_results_that_recount(tmp_path, run_cli):
    out = tmp_path / "flawed"
    res = run_cli("demo", "--task", "flawed", "--smoke", "--seed", "1", "--out", out)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["sft_model", "more_sft", "rft", "dpo", "rounds"]
    held = [json.loads(x) for x in (out / "task" / "heldout.jsonl").read_text().splitlines()]
    assert len(held) == 40
    for arm, r in results.items():
        assert set(r) == {"accuracy"}
        rows = [json.loads(x) for x in (out / "arms" / arm / "eval_gen.jsonl").read_text().splitlines()]
        assert [x["question"] for x in rows] == [h["question"] for h in held]
        assert r["accuracy"] == recount(rows), arm
        assert f"{arm:10} {100 * r['accuracy']:8.1f}%" in res.stdout  # the table, on stdout
    details = json.loads((out / "details.json").read_text())
    arms = details["arms"]
    # Matched optimizer steps; a pair is two sequences, so the SFT arms take twice the rows per step.
    assert {a: arms[a]["steps"] for a in arms} == {"more_sft": 6, "rft": 6, "dpo": 6, "rounds": 6}
    assert arms["more_sft"]["examples"] == arms["rft"]["examples"] == 6 * 8
    assert arms["dpo"]["examples"] == 6 * 4
    assert [r["steps"] for r in arms["rounds"]["rounds"]] == [2, 2, 2]
    # Round 1 samples the SFT model exactly as the dpo arm did: the same pairs.
    dpo_pairs = (out / "arms" / "dpo" / "train" / "data.jsonl").read_text()
    assert (out / "rounds" / "round-1" / "data.jsonl").read_text() == dpo_pairs


def test_demo_task_flawed_refuses_a_directory_it_did_not_make(tmp_path, run_cli):
    from helpers import one_line_error

    (tmp_path / "notes.txt").write_text("mine")
    one_line_error(run_cli("demo", "--task", "flawed", "--smoke", "--out", tmp_path), str(tmp_path),
                   "did not write (notes.txt)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_bayes_floor_by_hand(tmp_path):
    from prefpipe.demo.flawed_run import bayes_floor
    from prefpipe.demo.sft import build_word_tokenizer
    from prefpipe.demo.task import corpus

    tok = build_word_tokenizer(tmp_path, corpus(demo_problems()))
    valid = [{"carry": True, "flawed": True, "answer": "#### 2"},  # 7 + 5 with the carry dropped: ####, ' ', 2, EOS
             {"carry": True, "flawed": False, "answer": "#### 12"},  # ####, ' ', 1, 2, EOS
             {"carry": False, "flawed": False, "answer": "#### 5"}]  # 4 tokens, all certain
    # -ln 0.6 on the flawed carry's first digit, -ln 0.4 on the right one's, over 4 + 5 + 4 = 13 answer tokens.
    assert bayes_floor(tok, valid, 0.6) == pytest.approx((0.5108256 + 0.9162907) / 13, rel=1e-6)


def test_smoke_is_only_for_the_flawed_task(tmp_path, run_cli):
    from helpers import one_line_error

    one_line_error(run_cli("demo", "--smoke", "--out", tmp_path / "d"), "--smoke is for --task flawed")
    assert not (tmp_path / "d").exists()
