"""Block attention (`prefpipe.attention`) against attention written out in float64 from its definition, and the
switch `load_model` makes: sdpa models get it, and ordinary (padded) forwards are unchanged by it."""

from __future__ import annotations

import math

import pytest
import torch

from prefpipe import attention
from prefpipe.attention import BLOCKS_KWARG, SEGMENTED, packed_blocks, prefix_blocks


class Layer(torch.nn.Module):
    """Stands in for a transformers attention layer: sdpa reads only these two attributes."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True


def by_definition(q, k, v, allowed, scale):
    """softmax(q k^T * scale over allowed keys) v, per head, in float64 with explicit loops over queries."""
    heads, T, _ = q.shape
    groups = heads // k.shape[0]
    out = torch.zeros(T, heads, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        kh, vh = k[h // groups].double(), v[h // groups].double()
        for i in range(T):
            keys = [j for j in range(T) if allowed(i, j)]
            w = torch.tensor([float(q[h, i].double() @ kh[j]) * scale for j in keys])
            w = (w - w.max()).exp()
            out[i, h] = (w[:, None] * vh[keys]).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_blocks_equal_attention_by_definition(kv_heads):
    """Two pairs in prompt-once layout, prompt 3 / first 2 / second 4 and prompt 1 / first 3 / second 1 (a
    one-token block): each query attends to its own block causally and to its block's prefix."""
    layout = [(3, 2, 4), (1, 3, 1)]
    blocks = prefix_blocks(layout)
    assert blocks == ((0, 5, 0, 0), (5, 9, 0, 3), (9, 13, 9, 9), (13, 14, 9, 10))
    T, heads, dim = 14, 4, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, T, dim, generator=g) for n in (heads, kv_heads, kv_heads))

    def allowed(i, j):
        start, end, p0, p1 = next(b for b in blocks if b[0] <= i < b[1])
        return (start <= j <= i) or (p0 <= j < p1)

    got, _ = attention._forward(Layer(heads // kv_heads), q, k, v, None, scaling=0.3, **{BLOCKS_KWARG: blocks})
    want = by_definition(q[0], k[0], v[0], allowed, 0.3)
    assert got.shape == (1, T, heads, dim)
    assert float((got[0].double() - want).abs().max()) < 1e-5


def test_packed_blocks_and_the_mask_path():
    """One causal block per sequence; without blocks the function is sdpa with the mask it is given."""
    assert packed_blocks([3, 1, 2]) == ((0, 3, 0, 0), (3, 4, 3, 3), (4, 6, 4, 4))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    blocks = packed_blocks([3, 1, 2])
    got, _ = attention._forward(Layer(1), q, k, v, None, scaling=1 / math.sqrt(4), **{BLOCKS_KWARG: blocks})
    seg = [0, 0, 0, 1, 2, 2]
    want = by_definition(q[0], k[0], v[0], lambda i, j: seg[i] == seg[j] and j <= i, 0.5)
    assert float((got[0].double() - want).abs().max()) < 1e-5
    mask = torch.tensor([[seg[i] == seg[j] and j <= i for j in range(6)] for i in range(6)])[None, None]
    via_mask, _ = attention._forward(Layer(1), q, k, v, mask, scaling=0.5)
    assert float((via_mask[0].double() - want).abs().max()) < 1e-5


def test_load_model_switches_sdpa_and_keeps_padded_scores(tiny_model):
    """The switch leaves padded batches (and the saved config) as they were, and a packed forward really runs
    through the blocks."""
    from transformers import AutoModelForCausalLM

    from prefpipe.logprobs import pad_batch, sequence_logprobs
    from prefpipe.modeling import load_model
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    lm = load_model(str(tiny_model)).eval()
    assert plain.config._attn_implementation == "sdpa" and lm.config._attn_implementation == SEGMENTED
    assert "_attn_implementation" not in lm.config.to_json_string()
    seqs = [[5, 9, 31, 7, 2], [40, 3], [8, 8, 8, 60]]
    ids, mask = pad_batch(seqs, 0)
    plens = torch.tensor([2, 1, 3])
    calls = []
    real = attention._forward

    def spy(*a, **kw):
        calls.append(kw.get(BLOCKS_KWARG))
        return real(*a, **kw)
    from transformers import AttentionInterface
    AttentionInterface.register(SEGMENTED, spy)
    try:
        with torch.no_grad():
            want = sequence_logprobs(plain, ids, mask, plens).sums
            got = sequence_logprobs(lm, ids, mask, plens).sums
            assert calls and all(c is None for c in calls)
            calls.clear()
            packed = sequence_logprobs(lm, torch.tensor([sum(seqs, [])]), None, plens,
                                       seq_lens=torch.tensor([5, 2, 4])).sums
    finally:
        AttentionInterface.register(SEGMENTED, real)
    assert len(calls) == lm.config.num_hidden_layers and all(c == packed_blocks([5, 2, 4]) for c in calls)
    assert float((got - want).abs().max()) <= 1e-6
    assert float((packed - want).abs().max()) <= 1e-5
