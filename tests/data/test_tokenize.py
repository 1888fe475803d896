"""Tokenization rules of REFERENCE section 2, checked against direct tokenizer calls."""

import pytest
from helpers import write_jsonl

from prefpipe.data.formats import Dataset
from prefpipe.data.tokenize import PairTokenizer, TokenizeSettings, TokenStats
from prefpipe.errors import UserError


def tokenize(tok, tmp_path, rows, settings=TokenizeSettings()):
    ds = Dataset(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    stats = TokenStats()
    out = {}
    for batch in ds.batches():
        for k, v in PairTokenizer(tok, settings).tokenize(batch, stats, ds.paired).items():
            out.setdefault(k, []).extend(v)
    return out, stats


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_ending_in_space_is_tokenized_separately(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    prompt, chosen, rejected = "The answer is ", "the lazy dog", "quick fox"
    out, _ = tokenize(tok, tmp_path, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert out["prompt_ids"][0] == [bos] + enc(tok, prompt)
    assert out["chosen_ids"][0] == enc(tok, chosen) + [eos]
    assert out["rejected_ids"][0] == enc(tok, rejected) + [eos]
    # The rule matters: joint tokenization merges the space into the response's first token.
    assert enc(tok, prompt + chosen) != enc(tok, prompt) + enc(tok, chosen)
    assert tok.decode(out["prompt_ids"][0] + out["chosen_ids"][0], skip_special_tokens=True) == prompt + chosen


def test_non_ascii_response_round_trips(tiny_tokenizer, tmp_path):
    text = "Grüße aus 東京 🙂 — naïve café"
    out, _ = tokenize(tiny_tokenizer, tmp_path, [{"prompt": "Say it:", "chosen": text, "rejected": "no"}])
    ids = out["chosen_ids"][0]
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[:-1]) == text


def test_chat_template_that_emits_bos_gets_one_bos(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    assert "{{ bos_token }}" in tok.chat_template
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "bye"}]}
    out, _ = tokenize(tok, tmp_path, [row])
    p = out["prompt_ids"][0]
    assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1
    assert p == enc(tok, "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # The template writes the end of turn; no EOS is appended to a conversational response.
    assert out["chosen_ids"][0] == enc(tok, "hello<|im_end|>\n")
    assert tok.eos_token_id not in out["chosen_ids"][0]


def test_plain_prompt_gets_bos_once_even_if_text_has_it(tiny_tokenizer, tmp_path):
    out, _ = tokenize(tiny_tokenizer, tmp_path, [{"prompt": "<s>hello", "chosen": "a", "rejected": "b"}])
    assert out["prompt_ids"][0].count(tiny_tokenizer.bos_token_id) == 1


def test_truncation_prompt_left_then_response_right(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    prompt = " ".join(f"w{i}" for i in range(40))
    chosen = " ".join(f"c{i}" for i in range(40))
    settings = TokenizeSettings(max_length=24, max_prompt_length=10)
    out, stats = tokenize(tok, tmp_path, [{"prompt": prompt, "chosen": chosen, "rejected": "short"}], settings)
    full_p = [tok.bos_token_id] + enc(tok, prompt)
    assert len(full_p) > 10
    assert out["prompt_ids"][0] == [tok.bos_token_id] + full_p[-9:]  # BOS kept, then the prompt's end
    assert out["chosen_ids"][0] == (enc(tok, chosen) + [tok.eos_token_id])[:24 - 10]  # the response's start
    assert out["rejected_ids"][0] == enc(tok, "short") + [tok.eos_token_id]  # fits: untouched
    assert (stats.prompt_truncated, stats.response_truncated, stats.rows_kept) == (1, 1, 1)


def test_skips_are_counted_not_silent(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "", "rejected": "x"},
            {"prompt": "p", "chosen": "ok", "rejected": "fine"},
            {"prompt": "p", "chosen": "ok", "rejected": "fine"}]
    out, stats = tokenize(tiny_tokenizer, tmp_path, rows)
    assert stats.rows_read == 4 and stats.rows_kept == 2 and len(out["row_id"]) == 2
    assert dict(stats.skipped) == {"chosen_equals_rejected": 1, "empty_response": 1}
    assert [r["row"] for r in stats.skip_records] == [1, 2]
    assert stats.duplicates == 1


def test_unpaired_columns(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "q", "completion": "yes", "label": True}, {"prompt": "q", "completion": "no", "label": False}]
    out, _ = tokenize(tiny_tokenizer, tmp_path, rows)
    assert set(out) == {"row_id", "prompt_ids", "completion_ids", "label"}
    assert out["label"] == [True, False]


def test_settings_reject_impossible_budgets():
    with pytest.raises(UserError, match="smaller than"):
        TokenizeSettings(max_length=10, max_prompt_length=10)
