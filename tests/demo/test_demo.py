"""The demo's pieces at tiny sizes: task, word-level tokenizer, SFT loop, on-policy pairs, generation eval, config.

The full demo takes minutes and is not run here; its measured numbers are in bench/RESULTS.md.
"""

import json
import math
import re

import pytest
import torch

from prefpipe.answers import gold_answer
from prefpipe.demo.task import PROMPT_TEMPLATE, all_problems, corpus, make_splits
from prefpipe import rundir

PLUS = ("gets", "found", "adds")
MINUS = ("gives", "lost", "takes")


def test_every_problem_is_right_and_in_gsm8k_format():
    rows = all_problems()
    assert len(rows) == len({r["question"] for r in rows})  # every question once
    for r in rows:
        a, b = (int(x) for x in re.findall(r"\d+", r["question"]))
        words = r["question"].split()
        op = "+" if any(w in words for w in PLUS) else "-"
        assert (any(w in words for w in MINUS)) == (op == "-")
        c = a + b if op == "+" else a - b
        assert 0 <= a <= 9 and 0 <= b <= 9 and c >= 0
        assert r["answer"] == f"#### {c}"
        assert gold_answer(r["answer"]) == str(c)


def test_splits_are_disjoint_and_seeded():
    train, held = make_splits(300, 100, seed=1)
    assert len(train) == 300 and len(held) == 100
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert make_splits(300, 100, seed=1) == (train, held)
    assert make_splits(300, 100, seed=2)[0] != train
    with pytest.raises(ValueError):
        make_splits(len(all_problems()), 1)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A 2-layer hidden-64 word-level Llama after a short SFT run on 200 problems."""
    from prefpipe.demo.sft import SFTSettings, build_demo_model, build_word_tokenizer, train_sft

    torch.set_num_threads(2)
    d = tmp_path_factory.mktemp("demo-sft")
    train, held = make_splits(200, 40, seed=0)
    tok = build_word_tokenizer(d, corpus(all_problems()))
    model = build_demo_model(tok, hidden_size=64, intermediate_size=128, seed=0)
    logs = []
    summary = train_sft(model, tok, [PROMPT_TEMPLATE.format(question=r["question"]) for r in train],
                        [r["answer"] for r in train], SFTSettings(steps=100, batch_size=16, lr=1e-2, warmup_steps=5),
                        log=logs.append)
    model.save_pretrained(str(d))
    return d, model, tok, train, held, summary, logs


def test_word_tokenizer_and_model_size(sft_model):
    d, model, tok, *_ = sft_model
    text = "Q: Ann has 7 apples and gets 12 more.\nA: #### 19"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["Q", ":", " Ann", " has", " ", "7", " apples", " and", " gets", " ",
                                              "1", "2", " more", ".", "\n", "A", ":", " ", "####", " ", "1", "9"]
    for t in corpus(all_problems()[:50]):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == t
        assert len(ids) < 0.5 * len(t)  # the point of word tokens: well under half the characters
    assert tok("ab")["input_ids"][0] == tok.bos_token_id
    from prefpipe.demo.sft import build_demo_model
    big = build_demo_model(tok)  # the demo's size
    V, H, L, I = len(tok), 128, 2, 512
    expected = 2 * V * H + L * (4 * H * H + 3 * H * I + 2 * H) + H
    assert sum(p.numel() for p in big.parameters()) == expected
    assert 0.4e6 < expected < 0.6e6


def test_sft_stops_at_the_target_accuracy(sft_model):
    d, model, tok, train, held, *_ = sft_model
    from prefpipe.demo.sft import SFTSettings, build_demo_model, greedy_accuracy, train_sft
    prompts = [PROMPT_TEMPLATE.format(question=r["question"]) for r in train[:40]]
    answers = [r["answer"] for r in train[:40]]
    check = (prompts[:20], answers[:20])
    logs = []
    fresh = build_demo_model(tok, hidden_size=32, intermediate_size=64, seed=1)
    s = train_sft(fresh, tok, prompts, answers, SFTSettings(steps=12, batch_size=4, target_accuracy=0.0,
                                                             check_every=5), log=logs.append, check=check)
    assert s["steps"] == 5 and "reached the target 0.0" in logs[-1]  # any accuracy reaches 0: the first check
    assert s["check_accuracy"] == greedy_accuracy(fresh, tok, *check)
    s = train_sft(fresh, tok, prompts, answers, SFTSettings(steps=12, batch_size=4, target_accuracy=1.01,
                                                             check_every=5), log=logs.append, check=check)
    assert s["steps"] == 12  # never reached: the whole schedule runs
    # The trained fixture model against a hand count of its greedy answers.
    from prefpipe.evaluation.generate import encode_prompts, hf_generate
    gens = hf_generate(model, tok, encode_prompts(tok, prompts), max_new_tokens=10, batch_size=8)
    by_hand = sum(re.fullmatch(r"#### (\d+)", g[0].strip()) is not None and
                  g[0].strip() == a for g, a in zip(gens, answers)) / 40
    assert greedy_accuracy(model, tok, prompts, answers) == by_hand


def test_sft_learns_the_format(sft_model):
    d, model, tok, train, held, summary, logs = sft_model
    # Default init (std 0.02) gives near-uniform predictions: the first loss is about ln(vocab). The answers are
    # short ("#### 7" + EOS) and share most tokens, so a few random logit offsets move it by up to ~0.3 nats.
    from prefpipe.logprobs import pad_batch, sequence_logprobs
    from prefpipe.demo.sft import build_demo_model, encode_examples
    fresh = build_demo_model(tok, hidden_size=64, intermediate_size=128, seed=0).eval()
    ex = encode_examples(tok, [PROMPT_TEMPLATE.format(question=r["question"]) for r in train[:32]],
                         [r["answer"] for r in train[:32]])
    ids, mask = pad_batch([p + a for p, a in ex], tok.pad_token_id)
    with torch.no_grad():
        s, c, *_ = sequence_logprobs(fresh, ids, mask, torch.tensor([len(p) for p, _ in ex]))
    first = float(-s.sum() / c.sum())
    assert first == pytest.approx(math.log(len(tok)), abs=0.35)
    assert summary["final_loss"] < 0.5 * first
    assert len(logs) == 1 and "sft step 100/100" in logs[0]


def test_sft_and_sampling_show_bars_with_totals_and_etas(sft_model, capsys):
    """The defaults a user runs (stderr a log file, not a terminal): each stage's bar shows n/N and the time left."""
    d, model, tok, train, *_ = sft_model
    from prefpipe.demo.pairs import PairSettings, sample_pairs
    from prefpipe.demo.sft import SFTSettings, build_demo_model, train_sft
    prompts = [PROMPT_TEMPLATE.format(question=r["question"]) for r in train[:5]]
    answers = [r["answer"] for r in train[:5]]
    fresh = build_demo_model(tok, hidden_size=32, intermediate_size=64, seed=1)
    train_sft(fresh, tok, prompts, answers, SFTSettings(steps=3, batch_size=4, warmup_steps=1), log=lambda m: None)
    err = capsys.readouterr().err
    assert re.search(r"sft: .*3/3 \[\d\d:\d\d<\d\d:\d\d", err), err  # elapsed<remaining
    sample_pairs(model, tok, prompts, answers, PairSettings(samples=2, max_new_tokens=4, batch_size=2))
    err = capsys.readouterr().err
    assert re.search(r"pairs: sampling x 2: .*5/5 \[\d\d:\d\d<\d\d:\d\d", err), err


def test_pairs_are_judged_by_the_final_number(sft_model):
    d, model, tok, train, held, *_ = sft_model
    from prefpipe.demo.pairs import PairSettings, kto_view, sample_pairs
    qs = train[:40]
    prompts = [PROMPT_TEMPLATE.format(question=r["question"]) for r in qs]
    rows, stats = sample_pairs(model, tok, prompts, [r["answer"] for r in qs],
                               PairSettings(samples=6, max_new_tokens=20, pairs_per_question=2))
    assert stats["samples"] == 240 and stats["pairs"] == len(rows) > 0
    gold = {PROMPT_TEMPLATE.format(question=r["question"]): gold_answer(r["answer"]) for r in qs}

    def final(text):  # the marker's number, else the last number (the documented fallback)
        return (re.findall(r"#### (\d+)", text) or re.findall(r"\d+", text)[-1:] or [None])[0]
    for row in rows:
        assert final(row["chosen"]) == gold[row["prompt"]]
        assert final(row["rejected"]) != gold[row["prompt"]]
    per_q = {}
    for row in rows:
        per_q[row["prompt"]] = per_q.get(row["prompt"], 0) + 1
    assert max(per_q.values()) <= 2 and len(per_q) == stats["questions_with_pairs"]
    kto = kto_view(rows)
    distinct = {(r["prompt"], r["chosen"]) for r in rows} | {(r["prompt"], r["rejected"]) for r in rows}
    assert len(kto) == len(distinct) and [k["label"] for k in kto[:2]] == [True, False]
    assert kto[0]["completion"] == rows[0]["chosen"] and kto[1]["completion"] == rows[0]["rejected"]


def test_pairs_take_the_most_frequent_answers():
    from prefpipe.demo.pairs import pairs_for_question
    samples = ["#### 3", "#### 5", "#### 7", "#### 5", "#### 9", "#### 5", "#### 7", "so 7"]
    got = pairs_for_question("Q", "7", samples, 2)
    # Right: "#### 7" (twice), "so 7" (once, by the last-number fallback). Wrong by frequency: 5 (3x), then 3.
    assert got == [{"prompt": "Q", "chosen": "#### 7", "rejected": "#### 5"},
                   {"prompt": "Q", "chosen": "so 7", "rejected": "#### 3"}]
    assert pairs_for_question("Q", "7", ["#### 1", "#### 2"], 2) == []
    assert pairs_for_question("Q", "7", ["#### 7"] * 3, 2) == []


def test_generation_eval_writes_every_verdict(sft_model, tmp_path, run_cli):
    d, model, tok, train, held, *_ = sft_model
    from helpers import write_jsonl
    gsm = write_jsonl(tmp_path / "heldout.jsonl", held)
    r = run_cli("eval", "--gen", gsm, "--model", d, "--prompt_template", PROMPT_TEMPLATE, "--max_new_tokens", "20",
                "--device", "cpu", "--out", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "ev" / rundir.EVAL_GEN).read_text())
    recs = [json.loads(x) for x in (tmp_path / "ev" / "eval_gen.jsonl").read_text().splitlines()]
    assert len(recs) == summary["n"] == 40
    assert [x["question"] for x in recs] == [h["question"] for h in held]
    for rec, h in zip(recs, held):
        m = re.search(r"#### (\d+)", rec["generation"])
        assert rec["gold"] == gold_answer(h["answer"])
        if m:
            assert rec["correct"] == (m.group(1) == rec["gold"]) and rec["rule"] == "marker"
    assert summary["correct"] == sum(x["correct"] for x in recs)
    assert summary["accuracy"] == summary["correct"] / 40
    assert summary["extraction"]["marker"] >= 30  # the SFT model has learnt to end with '#### N'


def test_demo_config_is_an_ordinary_pipeline_config(tmp_path):
    from prefpipe.pipeline.config import resolve
    from prefpipe.demo.run import DemoSettings, write_config
    s = DemoSettings(out=str(tmp_path), seed=4)
    (tmp_path / "sft").mkdir()
    cfg = resolve(str(write_config(s, tmp_path)), {})
    assert cfg.losses == s.loss_types and cfg.betas == s.betas and cfg.kto_train.betas == tuple(s.kto_betas)
    assert (cfg.train.optim.lr, cfg.kto_train.optim.lr, cfg.train.loop.seed, cfg.train.loop.batch_size) == \
        (s.lr, s.kto_lr, 4, s.batch_size)
    assert cfg.settings.model == str(tmp_path.resolve() / "sft")
    assert cfg.held_out.gen == str(tmp_path.resolve() / "task" / "heldout.jsonl")
    assert cfg.eval.prompt_template == PROMPT_TEMPLATE
