"""`--reward model` (prefpipe.generation.reward_model) against per-sample forwards computed here, one at a time."""

import pytest
import torch

from helpers import make_sample
from prefpipe.errors import UserError
from prefpipe.generation.judges import make_judge

LONG = "the cat sat on a mat while seven quick foxes jumped over lazy dogs " * 3


def build_reward_model(d, tokenizer, *, num_labels=1, pad_token_id=None, seed=1):
    """A random-init 2-layer LlamaForSequenceClassification saved with `tokenizer` to `d`."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from prefpipe.tiny import save_random
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         num_labels=num_labels, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id if pad_token_id is None else pad_token_id)
    save_random(LlamaForSequenceClassification, config, d, tokenizer, seed)
    return d


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_tokenizer):
    return build_reward_model(tmp_path_factory.mktemp("rm"), tiny_tokenizer)


def last_token_score(d, ids: list[int]) -> float:
    """The score head on the final hidden state of the last token, for one unpadded sequence."""
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return float(model.score.weight[0] @ hidden)


def chatml(tok, messages) -> list[int]:
    """The tiny tokenizer's template written out by hand (BOS, then ChatML turns), tokenized."""
    text = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    return ids


def test_scores_are_the_last_token_logit_of_the_chat_rendering(reward_dir, tiny_tokenizer):
    judge = make_judge("model", reward_model=str(reward_dir), batch_size=3)
    assert judge.name == f"model:{reward_dir.resolve()}" and not judge.binary
    assert len(judge.fingerprint) == 64
    judge.check_rows([{"prompt": "x"}], "d.jsonl")
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 3 plus 4?"}]
    cases = [("what is 3 plus 4?", "7"), ("what is 3 plus 4?", ""), ("Q", LONG), (convo, "7, thank you."),
             ("how are you?", "I am fine."), ("a", LONG[:30])]
    samples = [make_sample(i, [i], prompt=p, completion=c) for i, (p, c) in enumerate(cases)]
    judge.score(samples)  # two batches of 3, each mixing lengths (longest first)
    for s, (prompt, completion) in zip(samples, cases):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids = chatml(tiny_tokenizer, messages + [{"role": "assistant", "content": completion}])
        assert s.reward == pytest.approx(last_token_score(reward_dir, ids), abs=1e-5), s.sample_index
    assert len({round(s.reward, 4) for s in samples}) == len(samples)  # the scores tell the samples apart
    judge.close()
    again = [make_sample(0, [0], prompt="Q", completion=LONG)]
    judge.score(again)  # loads again after close
    assert again[0].reward == pytest.approx(samples[2].reward, abs=1e-5)


def test_without_a_chat_template_and_with_pad_equal_to_eos(tmp_path):
    """Plain prompt + completion text. The config's pad id is EOS and completions end with EOS: transformers'
    own pooling would read the token before it; the score must be the last token's."""
    from prefpipe.tiny import build_tokenizer
    tok = build_tokenizer(tmp_path / "tok", chat_template=None)
    d = build_reward_model(tmp_path / "rm", tok, pad_token_id=tok.eos_token_id)
    texts = [("Question: what is 3 plus 4?", " Answer: 7</s>"), ("Q", LONG + "</s>"), ("Q:", " 7")]
    samples = [make_sample(i, [i], prompt=p, completion=c) for i, (p, c) in enumerate(texts)]
    make_judge("model", reward_model=str(d), batch_size=8).score(samples)
    for s, (p, c) in zip(samples, texts):
        ids = [tok.bos_token_id] + tok(p + c, add_special_tokens=False)["input_ids"]
        assert s.reward == pytest.approx(last_token_score(d, ids), abs=1e-5)
    # The check can fail: the one-before-last token's score is another number.
    ids = [tok.bos_token_id] + tok(texts[0][0] + texts[0][1], add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.eos_token_id
    assert abs(samples[0].reward - last_token_score(d, ids[:-1])) > 1e-3
    with pytest.raises(UserError) as e:
        make_judge("model", reward_model=str(d)).score([make_sample(0, [0], prompt=[{"role": "user",
                                                                                      "content": "hi"}])])
    assert "no chat template" in str(e.value) and "prompt 0 (row id r0), sample 0" in str(e.value)


def test_two_outputs_are_refused(tmp_path, tiny_tokenizer):
    d = build_reward_model(tmp_path / "rm2", tiny_tokenizer, num_labels=2)
    judge = make_judge("model", reward_model=str(d))
    for call in (lambda: judge.check_rows([], "d.jsonl"), lambda: judge.score([make_sample(0, [0])])):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == f"file {d}: a reward model has one output; this one has 2 (num_labels in its " \
                               f"config.json)"


def test_too_long_for_the_reward_model(reward_dir):
    with pytest.raises(UserError) as e:
        make_judge("model", reward_model=str(reward_dir)).score(
            [make_sample(0, [0]), make_sample(1, [1], completion=LONG * 4)])
    assert "sample 1 is" in str(e.value) and "reads 1 to 256 (max_position_embeddings)" in str(e.value)
