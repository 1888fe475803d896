"""Can this model run packed rows? The two probes, one per phase, and what follows from them.

Training packs a micro-batch's sequences into one row (padding-free, `--padding_free`); precompute lays a row's
prompt once before both its responses (`--prompt_once`). Both rely on attention that keeps the sequences apart
(`prefpipe.attention`), and a model's own code can defeat that (custom kernels, recurrent state, a decoder that
drops position ids), so each phase probes the model once before it trusts the layout: `choose_packing` (training,
via `packing_problem`) and `prompt_once_supported` (precompute's hf backend).
"""

from __future__ import annotations

import torch
from torch import nn

from prefpipe.attention import SEGMENTED, uses_blocks, window_binds
from prefpipe.logprobs import pad_batch
from prefpipe.scoring import score_pairs, score_sequences


# Attention implementations whose transformers mask builder turns restarting position ids (and no attention mask)
# into a block-diagonal causal mask (sdpa, eager, flex) or into varlen flash-attention, and prefpipe's block
# attention for sdpa models, which runs one causal sdpa per sequence.
PACKING_ATTENTION = (SEGMENTED, "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3",
                     "flash_attention_4")


def packing_problem(scorer: nn.Module, lm: nn.Module, device) -> str | None:
    """Why `lm` cannot score packed rows, or None when it can.

    Static checks first: the attention implementation must be one whose mask builder understands packed position
    ids (a custom or remote-code attention gets no mask at all, so sequences would see each other), and the model
    must be causal. Then a probe, because what matters is what the model's code actually does: two short
    sequences scored packed must match them scored padded, to 1e-3 nats per token (leaking attention or a
    recurrent state carried across the boundary, as in Mamba-style hybrid layers, moves them by far more).
    Every process runs the same probe (FSDP gathers parameters in lockstep), so all reach the same answer."""
    config = getattr(lm, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        return f"attention implementation {impl!r} has no packed-sequence mask in transformers"
    if not getattr(config, "is_causal", True):
        return "the model's attention is bidirectional"
    lengths, plens = [7, 5], [3, 2]
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 8:
        return "the model config has no vocab_size to draw a probe from"
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(vocab // 4, vocab, (n,), generator=g).tolist() for n in lengths]
    ids, mask = pad_batch(seqs, 0, device)
    packed = torch.tensor([seqs[0] + seqs[1]], device=device)
    pl = torch.tensor(plens, device=device)
    try:
        with torch.no_grad():
            want = scorer(ids, mask, pl).sums
            got = scorer(packed, None, pl, seq_lens=torch.tensor(lengths, device=device)).sums
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a decoder that takes no position_ids
        return f"a packed forward failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    worst = float(((got.double() - want.double()).abs() / torch.tensor([n - p for n, p in zip(lengths, plens)],
                                                                        device=device)).max())
    if not worst <= 1e-3:
        return f"packed and padded scores differ by {worst:.3g} nats per token (attention crosses sequences)"
    return None


def choose_packing(policy, requested: bool, device, log=print) -> bool:
    """Set and return `policy.packed` (a `train.parallel.Policy`): `--padding_free` where the model can pack, else
    the padded layout with a logged note saying why.

    Packs: decoders built on transformers' masking utilities with sdpa, eager, flex or flash attention, sliding
    windows and chunked attention included (their mask builders honour packed position ids). Falls back: custom
    or remote-code attention kernels, bidirectional models, decoders that take no `position_ids`, and hybrids
    whose recurrent layers (Mamba-style, linear attention) would carry state from one packed sequence into the
    next (the probe catches those). Cost: models loaded by prefpipe with sdpa attention get block attention
    (`prefpipe.attention`), and flash-attention runs varlen: both compute only each sequence's own causal block,
    `sum of length^2`. Plain sdpa (a model handed in from outside), eager and flex compute the whole `[T, T]`
    product of a packed row of T tokens, masked blocks included, so their attention grows with
    `(sum of lengths)^2`. Linear layers and the LM head see only real tokens either way."""
    policy.packed = False
    if not requested:
        return False
    problem = packing_problem(policy.scorer, policy.lm, device)
    if problem is not None:
        log(f"note: training on padded batches: {type(policy.lm).__name__} cannot run packed rows ({problem})")
        return False
    policy.packed = True
    return True


def prompt_once_supported(model, device=None, longest: int | None = None) -> str | None:
    """None when `score_pairs` gives this model the same scores as separate forwards; otherwise why not.

    The model needs prefpipe's block attention (`prefpipe.attention.install`, which `load_model` applies to sdpa
    models; eager, flash and flex attention score each response separately), no sliding window shorter than
    `longest`, the longest sequence it will score (such layers keep transformers' own mask, which cannot express
    a shared prompt; a longer window changes nothing: `prefpipe.attention.window_binds`), and a short probe's
    per-token log-probs must agree with `score_sequences` (a model that ignores the blocks or the position ids
    fails here)."""
    cfg = model.config
    if not uses_blocks(model):
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r} is not prefpipe's block attention"
    if window_binds(cfg, longest):
        window = getattr(cfg, "sliding_window", None)
        if not window:
            return "sliding-window attention (window size not in the config)"
        return f"sliding-window attention ({window}-token window" + (
            f", shorter than --max_length {longest})" if longest else "; sequence length unknown)")
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    draw = lambda k: torch.randint(1, vocab, (k,), generator=g).tolist()  # noqa: E731
    prompts, firsts, seconds = [draw(5), draw(3)], [draw(4), draw(7)], [draw(6), draw(2)]
    try:
        got = score_pairs(model, prompts, firsts, seconds, batch_tokens=64, per_token=True, device=device)
    except Exception as e:  # noqa: BLE001 - any failure means: use the separate forwards
        return f"{type(e).__name__}: {e}"
    want = score_sequences(model, prompts + prompts, firsts + seconds, batch_tokens=64, per_token=True,
                           device=device)
    low = next(model.parameters()).dtype != torch.float32
    worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got.tokens, want.tokens))
    if worst > (5e-2 if low else 1e-4):
        return f"probe scores differ from separate forwards by {worst:.2g} per token"
    return None
