"""The judges of `prefpipe generate` (prefpipe.generation.judges): answer, python and reward-model judges."""

import sys

import pytest

from helpers import make_sample
from prefpipe.errors import UserError
from prefpipe.generation.judges import make_judge


def one_line(excinfo, *needles):
    text = str(excinfo.value)
    assert "\n" not in text, text
    for n in needles:
        assert n in text, (n, text)
    return text


# ---------------------------------------------------------------- answer


GSM8K_GOLD = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72"


def test_answer_judge_compares_final_numbers():
    judge = make_judge("answer")
    assert judge.name == "answer:answer" and judge.binary
    completions = ["She sold 72 in all.\n#### 72", "so the answer is 72.", "#### 7", "no idea", "#### 72.0",
                   "#### 71 and then 72", "72 #### 70"]
    samples = [make_sample(i, [i], completion=c, row={"answer": GSM8K_GOLD}) for i, c in enumerate(completions)]
    judge.score(samples)
    # marker 72, last number 72, marker 7, none, 72.0 == 72, marker 71 (the marker wins), marker 70
    assert [s.reward for s in samples] == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("gold, completion", [(72, "#### 72"), ("72", "so 72"), (12.5, "#### 12.50"),
                                              ("$1,234", "#### 1234"), (-3, "#### -3")])
def test_answer_judge_takes_plain_gold_numbers(gold, completion):
    judge = make_judge("answer", gold_col="target")
    assert judge.name == "answer:target"
    right, wrong = (make_sample(0, [0], completion=completion, row={"target": gold}),
                    make_sample(1, [1], completion="#### 5", row={"target": gold}))
    judge.check_rows([right.row], "data.jsonl")
    judge.score([right, wrong])
    assert (right.reward, wrong.reward) == (1.0, 0.0)


def test_answer_judge_refuses_rows_without_a_gold_number():
    judge = make_judge("answer")
    good = {"question": "q", "answer": "#### 3"}
    with pytest.raises(UserError) as e:
        judge.check_rows([good, {"question": "q", "answr": "#### 3"}], "data.jsonl")
    one_line(e, "file data.jsonl, row 2, column 'answer'", "no gold answer", "did you mean 'answr'")
    for bad in ({"answer": "seventy-two"}, {"answer": None}, {"answer": True}, {"answer": "#### "}):
        with pytest.raises(UserError) as e:
            judge.check_rows([good, good, bad], "d.jsonl")
        one_line(e, "file d.jsonl, row 3, column 'answer'")
    with pytest.raises(UserError) as e:
        judge.score([make_sample(2, [1], prompt_index=5, completion="#### 3", row={"answer": "none"})])
    one_line(e, "prompt 5 (row id r5), sample 2", "has no number", "column 'answer'")


# ---------------------------------------------------------------- python

JUDGES = '''
import math
def exact(prompt, completion, row):
    return completion.strip() == row["want"]
def length(prompt, completion, row):
    return len(completion) / 10 if prompt == "Q" else -1
def mixed(prompt, completion, row):
    return True if completion == "a" else 2
def boom(prompt, completion, row):
    raise ValueError("cannot judge\\nthis one")
def nothing(prompt, completion, row):
    return None
def text(prompt, completion, row):
    return "yes " * 40
def nan(prompt, completion, row):
    return math.nan
def inf(prompt, completion, row):
    return -math.inf
'''


@pytest.fixture
def judge_module(tmp_path, monkeypatch, request):
    """A judge module in a fresh current directory, under a name no other test imports."""
    name = "judges_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    (tmp_path / f"{name}.py").write_text(JUDGES)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def samples_of(*completions, prompt="Q"):
    return [make_sample(i, [i], completion=c, prompt=prompt, prompt_index=3, row={"want": "a"})
            for i, c in enumerate(completions)]


def test_python_judge_bools_and_numbers(judge_module, tmp_path):
    judge = make_judge(f"python:{judge_module}:exact")
    assert judge.name == f"python:{judge_module}:exact"
    judge.check_rows([{"want": "a"}], "d.jsonl")
    assert str(tmp_path) not in sys.path  # the current directory is on the path only while importing
    s = samples_of("a", " a\n", "b")
    judge.score(s)
    assert [x.reward for x in s] == [1.0, 1.0, 0.0] and judge.binary
    judge = make_judge(f"python:{judge_module}:length")
    s = samples_of("abc", "", "a" * 25)
    judge.score(s)
    assert [x.reward for x in s] == [0.3, 0.0, 2.5] and not judge.binary
    judge = make_judge(f"python:{judge_module}:mixed")
    s = samples_of("a", "b")
    judge.score(s)
    assert [x.reward for x in s] == [1.0, 2.0] and not judge.binary  # an int among bools: real-valued


@pytest.mark.parametrize("function, needles", [
    ("boom", ["raised on prompt 3 (row id r3), sample 1", "ValueError: cannot judge this one"]),
    ("nothing", ["returned None on prompt 3 (row id r3), sample 1", "a bool or a finite number"]),
    ("text", ["returned 'yes yes", "...", "sample 1"]),
    ("nan", ["returned nan on prompt 3"]),
    ("inf", ["returned -inf on prompt 3"]),
])
def test_python_judge_refuses_what_is_not_a_reward(judge_module, function, needles):
    judge = make_judge(f"python:{judge_module}:{function}")
    with pytest.raises(UserError) as e:
        judge.score(samples_of("a", "b")[1:])
    text = one_line(e, f"--reward python:{judge_module}:{function}", *needles)
    assert len(text) < 300


def test_python_judge_module_or_function_missing(judge_module, tmp_path):
    with pytest.raises(UserError) as e:
        make_judge(f"python:{judge_module}:exacct").check_rows([], "d.jsonl")
    one_line(e, f"module '{judge_module}'", "has no function 'exacct'", "did you mean 'exact'")
    with pytest.raises(UserError) as e:
        make_judge("python:no_such_judge_module:f").check_rows([], "d.jsonl")
    one_line(e, "cannot import module 'no_such_judge_module'", str(tmp_path), "ModuleNotFoundError")
    (tmp_path / "broken_judge_module.py").write_text("def f(:\n")
    with pytest.raises(UserError) as e:
        make_judge("python:broken_judge_module:f").check_rows([], "d.jsonl")
    one_line(e, "cannot import module 'broken_judge_module'", "SyntaxError")
    assert str(tmp_path) not in sys.path


@pytest.mark.parametrize("args, needles", [
    (dict(reward="python:mod"), ["write python:MODULE:FUNCTION"]),
    (dict(reward="python::f"), ["write python:MODULE:FUNCTION"]),
    (dict(reward="answr"), ["unknown --reward 'answr'", "did you mean 'answer'"]),
    (dict(reward="model"), ["needs --reward_model DIR"]),
    (dict(reward="answer", reward_model="rm"), ["--reward_model is only read with --reward model"]),
    (dict(reward="model", reward_model="./no/such/rm"), ["no such model directory"]),
])
def test_make_judge_refuses_bad_settings(args, needles):
    with pytest.raises(UserError) as e:
        make_judge(args.pop("reward"), **args)
    one_line(e, *needles)
