"""Demo setup: a word-level tokenizer, a 0.5M-parameter Llama, and a small SFT loop.

This is the demo's starting point, not a prefpipe feature: prefpipe itself expects an SFT checkpoint from the user.
The loop is plain on purpose (AdamW, linear warmup then cosine decay, loss on answer tokens only) and scores with
the same `sequence_logprobs` the two phases use, so the answers it learns are tokenized exactly as precompute will
tokenize them (prompt ids with BOS, answer ids with EOS).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prefpipe.answers import gold_answer
from prefpipe.data.tokenize import PairTokenizer
from prefpipe.evaluation.evaluate import score_generations
from prefpipe.evaluation.generate import encode_prompts, hf_generate
from prefpipe.logprobs import pad_batch, sequence_logprobs
from prefpipe.progress_bar import around_bars, progress_bar
from prefpipe.train.schedule import lr_factor

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


# Words (with their leading space) and runs of '#' are one token each; digits and everything else one per char.
# Words as tokens make a prompt about 21 tokens instead of about 55 characters, which makes every phase of the demo
# ~2.5x cheaper; digits stay single tokens so that a number is written (and preferred) digit by digit.
WORD_PIECES = r"[ ]?[A-Za-z]+|#+|[\s\S]"


def build_word_tokenizer(out_dir: str | Path, texts: list[str]):
    """A word-level tokenizer over the pieces of `texts` (plus PAD/BOS/EOS/UNK); a plain call prepends BOS."""
    import re

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = sorted({m for t in texts for m in re.findall(WORD_PIECES, t)})
    vocab = {t: i for i, t in enumerate(SPECIALS + pieces)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>")
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def build_demo_model(tokenizer, *, hidden_size: int = 128, num_layers: int = 2, head_dim: int = 32,
                     intermediate_size: int = 512, seed: int = 0):
    """A randomly initialised Llama with the library's default init (about 0.5M parameters at the defaults)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=hidden_size // head_dim, head_dim=head_dim, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, attention_dropout=0.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class SFTSettings:
    """`steps` sets the schedule (warmup, then cosine decay to 0 at `steps`); with `target_accuracy` the run stops at
    the first check (every `check_every` steps) where greedy accuracy on the check questions reaches it."""
    steps: int = 160
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    target_accuracy: float | None = None
    check_every: int = 10


def encode_examples(tokenizer, prompts: list[str], answers: list[str]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) by the cache's rules: tokenized separately, BOS once on the prompt, EOS appended."""
    p_ids = PairTokenizer(tokenizer).encode_prompts(prompts)
    a_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    return [(p, list(a) + [tokenizer.eos_token_id]) for p, a in zip(p_ids, a_ids)]


def greedy_accuracy(model, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """Exact-match accuracy of greedy answers, judged by `prefpipe eval --gen`'s own scoring."""
    gens = hf_generate(model, tokenizer, encode_prompts(tokenizer, prompts), max_new_tokens=10, batch_size=512)
    rows = [{"row": i, "question": p, "gold": gold_answer(a)} for i, (p, a) in enumerate(zip(prompts, answers))]
    return score_generations(rows, [g[0] for g in gens])[0]["accuracy"]


def train_sft(model, tokenizer, prompts: list[str], answers: list[str], settings: SFTSettings,
              log=print, check: tuple[list[str], list[str]] | None = None, stop=None) -> dict:
    """Train `model` in place on (prompt, answer) texts; returns a small summary.

    `check` (prompts, answers) is what `settings.target_accuracy` is measured on. `stop(step)`, when given, is
    called every `settings.check_every` steps (model in eval mode) and ends the run when it returns a reason
    (logged); the flawed-demonstrations demo stops at a plateau of its validation loss this way.
    """
    torch.set_flush_denormal(True)  # tiny models slowed 5-7x mid-run on CPU from denormal floats otherwise
    examples = encode_examples(tokenizer, prompts, answers)
    device = next(model.parameters()).device
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay,
                            betas=(0.9, 0.98))
    model.train()
    order: list[int] = []
    start = time.perf_counter()
    losses = []
    accuracy = None
    stopped = False
    bar = progress_bar(settings.steps, "sft", "step")
    log = around_bars(log)
    for step in range(settings.steps):
        if len(order) < settings.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch = [examples[i] for i in order[:settings.batch_size]]
        del order[:settings.batch_size]
        ids, mask = pad_batch([p + a for p, a in batch], tokenizer.pad_token_id, device)
        prompt_lens = torch.tensor([len(p) for p, _ in batch], device=device)
        sums, counts = sequence_logprobs(model, ids, mask, prompt_lens)[:2]
        loss = -sums.sum() / counts.sum()
        for g in opt.param_groups:
            g["lr"] = settings.lr * lr_factor(step, settings.steps, settings.warmup_steps, "cosine")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        recent = losses[-100:]
        bar.set_postfix_str(f"loss {sum(recent) / len(recent):.4f}", refresh=False)  # last 100 steps: less jumpy
        bar.update(1)
        if settings.target_accuracy is not None and check is not None and (step + 1) % settings.check_every == 0:
            accuracy = greedy_accuracy(model, tokenizer, *check)
            model.train()
            if accuracy >= settings.target_accuracy:
                log(f"sft step {step + 1}: greedy accuracy {accuracy:.3f} on {len(check[0])} training questions "
                    f"reached the target {settings.target_accuracy}; stopping")
                break
        if stop is not None and (step + 1) % settings.check_every == 0:
            model.eval()
            reason = stop(step + 1)
            model.train()
            if reason:
                log(f"sft step {step + 1}: {reason}; stopping")
                stopped = True
                break
    bar.close()
    if not stopped and (accuracy is None or accuracy < (settings.target_accuracy or 0)):  # a stop said so already
        recent = losses[-100:]
        log(f"sft step {step + 1}/{settings.steps} done  loss {sum(recent) / len(recent):.4f}  "
            f"{time.perf_counter() - start:.0f}s")
    model.eval()
    return {"steps": step + 1, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "check_accuracy": accuracy,
            "seconds": round(time.perf_counter() - start, 1), "settings": asdict(settings)}


def save_sft(model, tokenizer, out_dir: str | Path, summary: dict):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "sft_summary.json").write_text(json.dumps(summary, indent=2))
