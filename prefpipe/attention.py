"""Block attention for packed rows: each sequence of a packed row attends only to itself (and to a shared prefix),
computed one block at a time instead of as one masked `[T, T]` product.

Why: transformers' sdpa path turns a packed row (restarting `position_ids`, no mask) into a block-diagonal
`[T, T]` mask, and sdpa then computes every masked score too, so attention costs `(sum of lengths)^2` instead of
`sum of length^2`. Flash-attention's varlen kernel avoids that on GPUs that have it; this module gives sdpa (CPU
and GPU) the same saving without a new kernel.

How: `install(model)` switches a model whose attention is `"sdpa"` to the implementation registered here,
`SEGMENTED`. Called without blocks, it *is* transformers' sdpa, with transformers' own sdpa mask, so padded
forwards, generation and everything else behave exactly as before. Called with `prefpipe_blocks=` (a keyword argument
that the decoder hands down to every attention layer; `packed_blocks` and `prefix_blocks` build its value), it
runs one causal sdpa per block and needs no mask: inside `blocks_only`, transformers builds none. Layers with a sliding window, attention sinks,
soft-capping or a position bias use the mask path instead, since their extras are not modelled here, except a
sliding window no shorter than the longest block, which changes nothing (`window_binds`); `blocks_only` keeps the
mask (block-diagonal, from the position ids) for a window that does bind. A model
whose decoder does not hand the keyword down would attend across sequences: both callers check each model on
a probe before use (`prefpipe.packing`).

A block is `(start, end, prefix_start, prefix_end)` over the packed row: queries `start..end-1` attend causally
to keys `start..end-1` and to every key of `prefix_start..prefix_end-1` (empty when equal). Blocks tile the row in
order. Padding-free training uses one block per sequence; prompt-once scoring packs `prompt + chosen` as one
block and `rejected` as a block whose prefix is the prompt.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch

SEGMENTED = "prefpipe_sdpa_blocks"
BLOCKS_KWARG = "prefpipe_blocks"
_NOT_MODELLED = ("sliding_window", "s_aux", "softcap", "position_bias")


def _forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, prefpipe_blocks=None,
             **kwargs):
    """The attention function registered as `SEGMENTED`: `[B, heads, T, dim]` in, `([B, T, heads, dim], None)`
    out, like transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = prefpipe_blocks
    window = kwargs.pop("sliding_window", None)
    binds = window is not None and blocks is not None and window < longest_span(blocks)
    if blocks is None or query.shape[0] != 1 or binds or any(kwargs.get(k) is not None for k in _NOT_MODELLED):
        if binds and any(p0 != p1 for _, _, p0, p1 in blocks):
            # The mask path cannot express a shared prompt; prompt_once_supported refuses such models up front.
            raise RuntimeError(f"sliding window {window} is shorter than a prompt-once sequence of "
                               f"{longest_span(blocks)} tokens")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=window, **kwargs)
    kwargs.pop("is_causal", None)
    outs = []
    for start, end, p0, p1 in blocks:
        q = query[:, :, start:end]
        if p0 == p1:
            k, v, mask = key[:, :, start:end], value[:, :, start:end], None  # plain causal: sdpa's is_causal
        else:
            k = torch.cat([key[:, :, p0:p1], key[:, :, start:end]], dim=2)
            v = torch.cat([value[:, :, p0:p1], value[:, :, start:end]], dim=2)
            n, m = end - start, p1 - p0
            mask = torch.ones(n, m + n, dtype=torch.bool, device=query.device).tril(m)[None, None]
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=True,
                                        **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


# Set while a decoder runs on blocks alone (`blocks_only`): transformers then skips building the `[T, T]` mask
# that no layer reads (at 9k packed tokens, 6% of a prompt-once forward on CPU).
_NO_MASK = contextvars.ContextVar("prefpipe_no_mask", default=False)


def _mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask
    return None if _NO_MASK.get() else sdpa_mask(*args, **kwargs)


def _register():
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(SEGMENTED, _forward)
    AttentionMaskInterface.register(SEGMENTED, _mask)


def longest_span(blocks) -> int:
    """The most keys any query of `blocks` attends to: its block's length plus its shared prefix's."""
    return max((end - start + p1 - p0 for start, end, p0, p1 in blocks), default=0)


def window_binds(config, longest: int | None) -> bool:
    """Whether a sliding-window layer of `config` would cut the context of a sequence of `longest` tokens (None:
    of unknown length). Query q sees key k when q - k < W (transformers' `sliding_window_overlay`), so a window
    of W tokens changes nothing for sequences of at most W tokens: such a model scores them like a full-attention
    one, and its windows are no reason to leave the block path (Phi-3's 2047 under `--max_length 1024`)."""
    window = getattr(config, "sliding_window", None)
    if not window and "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        return False
    return not window or longest is None or window < longest


@contextmanager
def blocks_only(model, blocks=None):
    """Around a decoder call that passes `blocks`: no attention mask is built, unless some layer would still read
    it (a sliding window shorter than the longest block, `window_binds`). The mask is built once per forward,
    before the layers, so activation checkpointing's recomputation (which reuses it) needs no context."""
    config = getattr(model, "config", None)
    if not uses_blocks(model) or window_binds(config, longest_span(blocks) if blocks else None):
        yield
        return
    token = _NO_MASK.set(True)
    try:
        yield
    finally:
        _NO_MASK.reset(token)


def install(model) -> bool:
    """Switch `model` (and its sub-models) from sdpa to `SEGMENTED`; True when it did. Other implementations
    (flash-attention already runs varlen; eager, flex and custom kernels) are left as they are."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    _register()
    model.set_attn_implementation(SEGMENTED)
    return model.config._attn_implementation == SEGMENTED


def uses_blocks(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == SEGMENTED


def packed_blocks(seq_lens: list[int]) -> tuple[tuple[int, int, int, int], ...]:
    """One causal block per sequence of a packed row."""
    blocks, start = [], 0
    for n in seq_lens:
        blocks.append((start, start + n, start, start))
        start += n
    return tuple(blocks)


def prefix_blocks(layout: list[tuple[int, int, int]]) -> tuple[tuple[int, int, int, int], ...]:
    """Blocks for rows laid out as `prompt + first + second` per `(prompt, first, second)` length triple: the
    prompt and first response as one causal block, the second response as a block that also sees the prompt."""
    blocks, start = [], 0
    for p, a, b in layout:
        blocks.append((start, start + p + a, start, start))
        if b:
            blocks.append((start + p + a, start + p + a + b, start, start + p))
        start += p + a + b
    return tuple(blocks)
