"""Tiny offline models: a byte-level BPE tokenizer trained with `tokenizers` and a random-init Llama.

Tests and the demo build these in seconds with no network. Both are written with `save_pretrained` and are
meant to be loaded back through the Auto classes, exactly as a user's checkpoint would be.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# ChatML-like, and it emits BOS itself: the tokenizer must not add a second one (see prefpipe.data.tokenize).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 3 plus 4? Answer: 7",
    "Human: how are you?\n\nAssistant: I am fine, thank you.",
    "Preference optimisation trains a policy against a frozen reference.",
    "Café, naïve, über, 東京, and emoji 🙂 are text too.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus times equals",
]


def build_tokenizer(out_dir: str | Path, corpus: list[str] | None = None, vocab_size: int = 400,
                    chat_template: str = CHAT_TEMPLATE):
    """Train a byte-level BPE tokenizer with BOS/EOS/PAD and a chat template; save it to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus or DEFAULT_CORPUS) * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # Like Llama: a plain `tokenizer(text)` call prepends BOS.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    hf_tok.chat_template = chat_template
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def build_model(out_dir: str | Path, tokenizer, *, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 2, head_dim: int = 32, intermediate_size: int | None = None,
                max_position_embeddings: int = 1024, seed: int = 0, tie_word_embeddings: bool = False):
    """Random-init `LlamaForCausalLM` sized for CPU tests; head_dim >= 32 so vLLM's CPU attention accepts it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
    )
    return save_random(LlamaForCausalLM, config, out_dir, tokenizer, seed)


def save_random(model_class, config, out_dir: str | Path, tokenizer, seed: int = 0):
    """`model_class(config)` with seeded random weights, saved with `tokenizer` to `out_dir`; the model."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    # A wider init than the default 0.02 makes the random model's log-probs far from uniform, so tests
    # that compare scores can tell rows and positions apart.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return model


def build_tiny(out_dir: str | Path, **model_kwargs) -> Path:
    """Tokenizer and model in one directory, loadable with AutoTokenizer/AutoModelForCausalLM."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    build_model(out_dir, tok, **model_kwargs)
    return out_dir
