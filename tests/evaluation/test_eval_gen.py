"""Batched greedy generation: left padding must not change a generation; an independent decoder agrees."""

import json

import pytest
import torch

from helpers import write_jsonl
from prefpipe.errors import UserError
from prefpipe.evaluation.evaluate import GenSettings, read_questions, render_prompts, score_generations
from prefpipe.evaluation.generate import encode_prompts, hf_generate

PROMPTS = ["Q", "Question: what is 3 plus 4? Answer:", "The quick brown fox", "Human: how are you?\n\nAssistant:",
           "0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus"]


def naive_greedy(model, prompt_ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding by full re-forwarding, one row at a time, no cache and no padding."""
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_batched_left_padded_generation_matches_naive_decoding(tiny_lm, tiny_tokenizer):
    ids = encode_prompts(tiny_tokenizer, PROMPTS)
    assert all(x[0] == tiny_tokenizer.bos_token_id and x.count(tiny_tokenizer.bos_token_id) == 1 for x in ids)
    batched = hf_generate(tiny_lm, tiny_tokenizer, ids, max_new_tokens=10, batch_size=8)
    expected = [tiny_tokenizer.decode(naive_greedy(tiny_lm, x, 10, tiny_tokenizer.eos_token_id),
                                      skip_special_tokens=True) for x in ids]
    assert [g[0] for g in batched] == expected
    # Batch size 2 splits the length-sorted rows differently; results come back in input order all the same.
    assert hf_generate(tiny_lm, tiny_tokenizer, ids, max_new_tokens=10, batch_size=2) == batched


def test_sampling_gives_several_samples_per_prompt_reproducibly(tiny_lm, tiny_tokenizer):
    ids = encode_prompts(tiny_tokenizer, PROMPTS[:3])
    a = hf_generate(tiny_lm, tiny_tokenizer, ids, max_new_tokens=6, num_samples=4, temperature=1.0, seed=3)
    b = hf_generate(tiny_lm, tiny_tokenizer, ids, max_new_tokens=6, num_samples=4, temperature=1.0, seed=3)
    assert a == b and [len(x) for x in a] == [4, 4, 4]
    assert any(len(set(x)) > 1 for x in a)  # temperature 1 on a random model: samples differ


def test_reading_and_scoring_questions(tmp_path):
    rows = [{"question": "q1", "answer": "1 + 1 = 2\n#### 2"}, {"question": "q2", "answer": "#### 1,000"},
            {"question": "q3", "answer": "x\n#### -5"}]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    qs = read_questions(path, GenSettings())
    assert [q["gold"] for q in qs] == ["2", "1000", "-5"]
    summary, recs = score_generations(qs, ["so #### 2", "it is 1000.", "#### 5"])
    assert [r["correct"] for r in recs] == [True, True, False]
    assert [r["rule"] for r in recs] == ["marker", "last_number", "marker"]
    assert summary == {"n": 3, "correct": 2, "accuracy": 2 / 3, "extraction": {"marker": 2, "last_number": 1,
                                                                              "none": 0}}
    assert len(read_questions(path, GenSettings(limit=2))) == 2


@pytest.mark.parametrize("line, message", [
    ('{"question": "q"}', "row 2, column 'answer': missing or empty text"),
    ('{"question": "q", "answer": "no marker 5"}', "row 2, column 'answer': no final number after '#### '"),
    ('{"question": 3, "answer": "#### 1"}', "row 2, column 'question'"),
    ('not json', "row 2: not valid JSON"),
])
def test_bad_question_rows_are_named(tmp_path, line, message):
    p = tmp_path / "gsm.jsonl"
    p.write_text(json.dumps({"question": "ok", "answer": "#### 1"}) + "\n" + line + "\n")
    with pytest.raises(UserError) as e:
        read_questions(p, GenSettings())
    assert message in str(e.value) and str(p) in str(e.value)


def test_prompt_rendering(tiny_tokenizer):
    assert render_prompts(tiny_tokenizer, ["2+2?"], GenSettings(prompt_template="Q: {question}\nA:")) == \
        ["Q: 2+2?\nA:"]
    chat = render_prompts(tiny_tokenizer, ["2+2?"], GenSettings(chat=True))[0]
    assert chat == "<s><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    # The chat template writes BOS itself: encoding must not add a second one.
    assert encode_prompts(tiny_tokenizer, [chat])[0].count(tiny_tokenizer.bos_token_id) == 1
    with pytest.raises(UserError, match="must contain"):
        render_prompts(tiny_tokenizer, ["x"], GenSettings(prompt_template="no slot"))


def test_generation_shows_a_bar_with_total_and_eta(tiny_model, tmp_path, monkeypatch):
    """A stage that takes more than a few seconds shows a bar with its total and an ETA on a terminal."""
    import io
    import sys

    from prefpipe.evaluation.evaluate import eval_generation, resolve_run

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": f"what is {i} plus 1?", "answer": f"#### {i + 1}"}
                                                  for i in range(5)])
    eval_generation(resolve_run(tiny_model), str(questions), GenSettings(max_new_tokens=2, batch_size=2,
                                                                         engine="hf", device="cpu"), tmp_path / "o")
    shown = term.getvalue()
    assert "5/5" in shown and "question" in shown
    assert "<" in shown.split("5/5")[-1] or "00:00<" in shown  # tqdm's elapsed<remaining (the ETA)
