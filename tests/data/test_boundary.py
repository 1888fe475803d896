"""The prompt/response boundary for every tokenizer family: the response's ids are those of the response in
context, so the decode of prompt + response ids is exactly prompt + response (no space that is not in the text).

Each family is built offline with `tokenizers`: byte-level BPE (GPT-2, Llama 3, Qwen), a SentencePiece-style BPE
whose normalizer prepends "▁" (Llama 2, Mistral, Phi-3, TinyLlama as converted by transformers), Metaspace
pre-tokenizers with prepend_scheme "first" and "always", and WordPiece (BERT-style, lossy decode)."""

from __future__ import annotations

import pytest

from prefpipe.data.formats import Record
from prefpipe.data.tokenize import PairTokenizer, TokenizeSettings, TokenStats

CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Question: how many clips did Natalia sell altogether? Answer: 72",
    "The quick brown fox jumps over the lazy dog. Café naïve 東京 🙂",
    "Human: hello there\n\nAssistant: general kenobi\n1 2 3 4 5 6 7 8 9 10",
] * 8

# (prompt, response): a prompt that ends in a space, one that does not, a response that starts with a space, a
# newline, a digit, punctuation, non-ASCII text, and an empty prompt.
PAIRS = [
    ("Question: how many clips? Answer: ", "Natalia sold 72 clips."),
    ("Question: how many clips? Answer:", " Natalia sold 72 clips."),
    ("Question: how many clips?\nAnswer:", "\nThe answer is 72"),
    ("Count: ", "48 then 24"),
    ("Say it", ", then stop."),
    ("Where? ", "東京 🙂 café"),
    ("Human: hello there\n\nAssistant:", " general kenobi"),
    ("The fox", "es jump"),
]

ALPHABET = sorted(set("".join(CORPUS + [p + r for p, r in PAIRS])) | {"▁"})


def _fast(tok):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def byte_level():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return _fast(tok)


def sentencepiece_prepend():
    """Llama 2's tokenizer.json as transformers converts it: normalizer Prepend("▁") + Replace(" ", "▁"), no
    pre-tokenizer, byte fallback, a decoder that turns "▁" back into spaces and strips the one leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # Trained split at "▁" so that, as in SentencePiece vocabularies, no piece spans two words; used without a
    # pre-tokenizer, as the converted Llama 2 tokenizer is.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>",
                            "<unk>"], initial_alphabet=ALPHABET, show_progress=False))
    tok.pre_tokenizer = None
    return _fast(tok)


def metaspace(scheme: str, split: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>",
                            "<unk>"], initial_alphabet=ALPHABET, show_progress=False))
    # Trained split at "▁" (no piece spans two words, as in SentencePiece vocabularies), used as configured.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    return _fast(tok)


def wordpiece():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>",
                            "<unk>"], show_progress=False))
    return _fast(tok)


LOSSLESS = {
    "byte_level": byte_level,
    "sentencepiece_prepend": sentencepiece_prepend,
    "metaspace_first": lambda: metaspace("first", False),
    "metaspace_first_split": lambda: metaspace("first", True),
    "metaspace_always": lambda: metaspace("always", True),
}


@pytest.fixture(scope="module", params=sorted(LOSSLESS))
def lossless(request):
    return request.param, LOSSLESS[request.param]()


def _tokenize(tok, pairs):
    recs = [Record(row_id=i, source="t.jsonl", row=i + 1, prompt=p, chosen=c, rejected=c + " no", content_hash=str(i))
            for i, (p, c) in enumerate(pairs)]
    return PairTokenizer(tok, TokenizeSettings(max_length=512)).tokenize(recs, TokenStats(), paired=True)


def test_decode_of_joined_ids_is_the_text(lossless):
    name, tok = lossless
    cols = _tokenize(tok, PAIRS)
    assert cols["row_id"] == list(range(len(PAIRS)))
    for i, (prompt, chosen) in enumerate(PAIRS):
        for col, text in (("chosen_ids", chosen), ("rejected_ids", chosen + " no")):
            ids = cols["prompt_ids"][i] + cols[col][i]
            assert ids[-1] == tok.eos_token_id  # plain-text responses end with EOS
            got = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            assert got == prompt + text, (name, i, tok.convert_ids_to_tokens(ids))


def test_joined_ids_equal_joint_tokenization_at_a_pretoken_boundary(lossless):
    """Where the boundary falls between two words (the response starts with a space or the prompt ends with a
    newline before a word), nothing can merge across it, so separate tokenization must give exactly the ids of
    tokenizing prompt + response as one text."""
    name, tok = lossless
    pairs = [("Question: how many clips? Answer:", " Natalia sold 72 clips."),
             ("Human: hello there\n\nAssistant:", " general kenobi")]
    cols = _tokenize(tok, pairs)
    for i, (prompt, chosen) in enumerate(pairs):
        joint = tok(prompt + chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert cols["prompt_ids"][i] + cols["chosen_ids"][i] == joint, (name, tok.convert_ids_to_tokens(joint))


def test_phi3_example_has_one_space():
    """The reported case: '...Answer: ' + 'Natalia sold...' must not become '...Answer:  Natalia' (':', '▁',
    '▁Natal', ...) with a SentencePiece-style tokenizer."""
    tok = sentencepiece_prepend()
    cols = _tokenize(tok, [("Question: how many clips? Answer: ", "Natalia sold 72 clips.")])
    resp = tok.convert_ids_to_tokens(cols["chosen_ids"][0])
    assert not resp[0].startswith("▁"), resp
    assert tok.convert_ids_to_tokens(cols["prompt_ids"][0])[-1].endswith("▁")


def test_wordpiece_boundary_between_words():
    """WordPiece decodes lossily (it joins words with spaces), so the check is the ids: with the boundary at a
    space, separate tokenization equals the joint tokenization, and a response never starts with a '##' piece."""
    tok = wordpiece()
    pairs = [("Question: how many clips? Answer: ", "Natalia sold 72 clips."), ("Count: ", "48 then 24")]
    cols = _tokenize(tok, pairs)
    for i, (prompt, chosen) in enumerate(pairs):
        joint = tok(prompt + chosen, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert cols["prompt_ids"][i] + cols["chosen_ids"][i] == joint
        assert not tok.convert_ids_to_tokens(cols["chosen_ids"][i])[0].startswith("##")


PHI3_STYLE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + '\n' + m['content'] + '<|end|>' + '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}")


def test_chat_rendering_with_sentencepiece_matches_the_whole_conversation():
    """Conversational rows through a "▁"-prepending tokenizer: prompt + response ids are the ids of the template's
    rendering of the whole conversation, the sequence an SFT model trained on; no extra "▁" after the header.
    (This normalizer prepends "▁" after every special token, in the whole conversation too, so its decode is not
    the rendered text; the ids are the check.)"""
    tok = sentencepiece_prepend()
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = PHI3_STYLE
    prompt = [{"role": "user", "content": "How many clips did Natalia sell?"}]
    answer = [{"role": "assistant", "content": "Natalia sold 72 clips."}]
    rec = Record(row_id=0, source="c.jsonl", row=1, prompt=prompt, chosen=answer,
                 rejected=[{"role": "assistant", "content": "About 50."}], content_hash="0")
    cols = PairTokenizer(tok, TokenizeSettings(max_length=512)).tokenize([rec], TokenStats(), paired=True)
    whole = tok.apply_chat_template(prompt + answer, tokenize=False)
    joint = tok(whole, add_special_tokens=False)["input_ids"]
    ours = cols["prompt_ids"][0] + cols["chosen_ids"][0]
    assert ours == joint, (tok.convert_ids_to_tokens(ours), tok.convert_ids_to_tokens(joint))


LLAMA3_DATED = ("{%- if not date_string is defined %}{%- if strftime_now is defined %}"
                "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '01 Jan 2000' %}"
                "{%- endif %}{%- endif %}"
                "{{ '<s>' }}Today Date: {{ date_string }}\n"
                "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def _dated_rows(tok, **settings):
    tok.chat_template = LLAMA3_DATED
    rec = Record(row_id=0, source="c.jsonl", row=1, prompt=[{"role": "user", "content": "hi"}],
                 chosen=[{"role": "assistant", "content": "hello"}],
                 rejected=[{"role": "assistant", "content": "go away"}], content_hash="0")
    pt = PairTokenizer(tok, TokenizeSettings(max_length=512, **settings))
    return tok.decode(pt.tokenize([rec], TokenStats(), paired=True)["prompt_ids"][0], skip_special_tokens=True)


def test_chat_templates_render_the_recorded_date_not_today():
    """A Llama 3.x-style template writes the date into every prompt; the ids must not depend on the day of the run.
    The default date is fixed (2024-07-26) and --chat_date sets another, passed as `date_string`."""
    tok = byte_level()
    assert "Today Date: 26 Jul 2024\n" in _dated_rows(tok)
    assert "Today Date: 02 Mar 2025\n" in _dated_rows(tok, chat_date="2025-03-02")


def test_a_template_that_reads_the_clock_directly_is_refused():
    from prefpipe.errors import UserError
    tok = byte_level()
    tok.chat_template = "{{ strftime_now('%d %B') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(UserError, match="strftime_now"):
        PairTokenizer(tok, TokenizeSettings(max_length=64))


def test_chat_date_is_part_of_the_tokenization_identity():
    a = TokenizeSettings(max_length=64).metadata()
    b = TokenizeSettings(max_length=64, chat_date="2025-03-02").metadata()
    assert a["chat_date"] == "2024-07-26" and b["chat_date"] == "2025-03-02"
    assert a != b


def test_chat_date_must_be_a_date():
    from prefpipe.options import OptionError
    with pytest.raises(OptionError):
        TokenizeSettings(chat_date="yesterday")


def test_data_check_shows_the_joined_decode(tmp_path):
    """`data check` decodes prompt + response as one sequence: ids with a spurious leading "▁" (what plain
    tokenization of the response gives) show the doubled space there, which decoding the two apart hides."""
    from prefpipe.data.cli import _joined
    tok = sentencepiece_prepend()
    prompt = tok("Answer: ", add_special_tokens=False)["input_ids"]
    spurious = tok("Natalia", add_special_tokens=False)["input_ids"]
    assert _joined(tok, prompt, spurious) == "Answer: ⟦|⟧ Natalia"
    assert tok.decode(spurious) == "Natalia"  # what the old, separate decode showed
    cols = _tokenize(tok, [("Answer: ", "Natalia")])
    assert _joined(tok, cols["prompt_ids"][0], cols["chosen_ids"][0]) == "Answer: ⟦|⟧Natalia</s>"
