"""The one `sequence_logprobs` that both phases use.

Phase one calls it under `torch.inference_mode()` to fill the cache; phase two calls it with gradients on for the
policy. Sharing it is what makes "policy == reference at step 0" hold to float32 round-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prefpipe.attention import BLOCKS_KWARG, blocks_only, packed_blocks, uses_blocks
from prefpipe.scores import Scores

# Rows of logits materialised at once: [chunk, vocab] float32. 4096 x 152k x 4 B is about 2.5 GB, so callers that
# care about memory on large vocabularies pass smaller chunks; the default suits the vocabularies of tests/benches.
DEFAULT_CHUNK_TOKENS = 1024


def pad_batch(seqs: list[list[int]], pad_id: int, device=None, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists into `input_ids [B, T]` and `attention_mask [B, T]` (long).

    Scoring pads on the right (real tokens keep positions 0..n-1); generation pads on the left, so that every
    row's next token is at the last position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, span] = torch.as_tensor(s, dtype=torch.long)
        mask[i, span] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


def _decoder_and_head(model):
    """Split a causal LM into its decoder stack and LM head, so logits are only formed where needed."""
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    if head is None or decoder is None or decoder is model:
        raise TypeError(f"{type(model).__name__} does not expose a decoder and an LM head")
    return decoder, head


def _token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias, temperature: float,
                    softcap, log_sum_sq: bool = False):
    logits = F.linear(hidden, weight, bias).float()
    if softcap:  # Gemma-2 style final-logit soft-capping, part of the model's distribution
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    logp = logits.log_softmax(-1)
    tok = logp.gather(-1, targets[:, None]).squeeze(-1)
    if not log_sum_sq:
        return tok
    # log sum_v p_v^2 from the chunk's own log-softmax (WPO's normaliser), so no second [chunk, vocab] tensor
    # is formed; it carries no gradient.
    return tok, torch.logsumexp(2.0 * logp.detach(), -1)


def _padded(values: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Flat per-token `values` [N] (row-major, as selected) as `[B, max count]`, zero after each row's count."""
    B = counts.shape[0]
    width = int(counts.max()) if B else 0
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(values.shape[0], device=values.device) - starts[rows]
    return values.new_zeros(B, width).index_put((rows, col), values)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, prompt_lens: torch.Tensor,
                      *, temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                      return_token_logprobs: bool = False, extras: tuple = (), seq_lens: torch.Tensor | None = None):
    """Summed log-probabilities of each row's response tokens.

    Args:
        model: a transformers causal LM (`get_decoder()` + `get_output_embeddings()`).
        input_ids: `[B, T]` long, prompt tokens then response tokens, right-padded.
        attention_mask: `[B, T]`, 1 on real tokens. Right padding only, so real tokens keep positions 0..n-1 and
            no `position_ids` are needed.
        prompt_lens: `[B]` long, number of prompt tokens per row (>= 1: the first token has no context).
        temperature: logits are divided by it before the log-softmax.
        chunk_tokens: response positions pushed through the LM head at once. Only response positions are ever
            projected, in float32, so peak memory is `chunk_tokens x vocab` rather than `B x T x vocab`.
        return_token_logprobs: also return the per-token log-probs (`Scores.tokens`, a list of `[n_i]` tensors).
        extras: names of extra per-token outputs, returned in `Scores.extras` as `[B, max n_i]` float32 tensors,
            zero after each row's count: "tokens", the per-token log-probs *with* gradient (LD-DPO's tails), and
            "log_sum_sq", `log sum_v p_v^2` of each scored position's distribution, without gradient (WPO). The
            second comes from the same float32 chunk as the log-softmax, so it costs no extra logits memory.
        seq_lens: packed mode (see `packed_sequence_logprobs`): `input_ids` is one `[1, sum(seq_lens)]` row of
            sequences laid end to end, `attention_mask` is None, and rows of the result are the sequences.

    Returns:
        `Scores(sums [B] float32, counts [B] long, ...)`: sum over response positions p (prompt_len <= p < len) of
        `log_softmax(logits[p-1] / temperature)[ids[p]]`, and the number of such positions. With gradients
        enabled each chunk is recomputed in backward (activation checkpointing), so training never stores
        `[N, vocab]` logits either.
    """
    if seq_lens is not None:
        return packed_sequence_logprobs(model, input_ids, prompt_lens, seq_lens, temperature=temperature,
                                        chunk_tokens=chunk_tokens, return_token_logprobs=return_token_logprobs,
                                        extras=extras)
    if bool((prompt_lens < 1).any()):
        raise ValueError("every row needs at least one prompt token")
    B, T = input_ids.shape
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    pos = torch.arange(T, device=input_ids.device)
    seq_lens = attention_mask.sum(-1)
    scored = (pos[None, :] >= prompt_lens[:, None]) & (pos[None, :] < seq_lens[:, None])  # [B, T] targets
    tgt_mask = scored[:, 1:]
    h = hidden[:, :-1][tgt_mask]  # [N, H]: the state at p-1 predicts token p
    targets = input_ids[:, 1:][tgt_mask]  # [N]
    rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T - 1)[tgt_mask]
    return _summed(model, head, h, targets, rows, tgt_mask.sum(-1), temperature, chunk_tokens,
                   return_token_logprobs, extras)


def packed_positions(seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(segment [T], position [T])` of each token of a packed row: which sequence it belongs to, and its
    position inside that sequence (restarting at 0 for every sequence)."""
    seg = torch.repeat_interleave(torch.arange(seq_lens.numel(), device=seq_lens.device), seq_lens)
    starts = torch.cumsum(seq_lens, 0) - seq_lens
    return seg, torch.arange(seg.numel(), device=seq_lens.device) - starts[seg]


def packed_sequence_logprobs(model, input_ids: torch.Tensor, prompt_lens: torch.Tensor, seq_lens: torch.Tensor, *,
                             temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                             return_token_logprobs: bool = False, extras: tuple = ()):
    """`sequence_logprobs` of sequences packed end to end into one row, with no padding.

    `input_ids` is `[1, T]` with `T = sum(seq_lens)`; sequence i occupies `seq_lens[i]` tokens and starts with
    its `prompt_lens[i]` prompt tokens. The decoder gets `position_ids` that restart at 0 for every sequence and
    no attention mask, from which transformers' masking utilities build a block-diagonal causal mask (sdpa,
    eager, flex); flash-attention runs varlen over the segment boundaries, and prefpipe's block attention
    (`prefpipe.attention`, what `load_model` gives sdpa models) runs one causal sdpa per sequence. Either way no
    token attends across sequences.
    Whether a given model honours that is checked once per run (`prefpipe.packing`), not here.

    Returns the same `Scores` as the padded call on the same sequences.
    """
    if bool((prompt_lens < 1).any()):
        raise ValueError("every row needs at least one prompt token")
    if input_ids.shape[0] != 1 or int(seq_lens.sum()) != input_ids.shape[1]:
        raise ValueError(f"a packed row must be [1, sum(seq_lens)]; got {list(input_ids.shape)} for "
                         f"{int(seq_lens.sum())} tokens")
    seg, pos = packed_positions(seq_lens)
    # target p of sequence i is scored when p >= prompt_lens[i]; p >= 1 then, so p-1 lies in the same sequence
    src = torch.nonzero((pos >= prompt_lens[seg])[1:]).squeeze(-1)
    return row_logprobs(model, input_ids, pos[None], _varlen_kwargs(model, seq_lens), src, src + 1, seg[src + 1],
                        (seq_lens - prompt_lens).clamp(min=0), temperature=temperature, chunk_tokens=chunk_tokens,
                        return_token_logprobs=return_token_logprobs, extras=extras)


def row_logprobs(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention: dict, src: torch.Tensor,
                 tgt: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, *, temperature: float = 1.0,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, return_token_logprobs: bool = False, extras: tuple = ()):
    """One decoder forward over a packed row, then the scored positions through the LM head: the tail of every
    unpadded layout (padding-free training, prompt-once scoring).

    `input_ids` and `position_ids` are `[1, T]`; `attention` holds the keyword arguments that keep the row's
    sequences apart (`prefpipe.attention` blocks, or flash-attention's varlen boundaries; empty for
    transformers' mask from the position ids). The hidden state at `src[j]` predicts token `tgt[j]`, which
    belongs to output row `rows[j]` (`[N]` each, `rows` sorted); `counts [S]` is each output row's number of
    scored tokens. Returns what `sequence_logprobs` returns for S rows."""
    decoder, head = _decoder_and_head(model)
    with blocks_only(model, attention.get(BLOCKS_KWARG)):
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                         **attention).last_hidden_state[0]
    return _summed(model, head, hidden[src], input_ids[0, tgt], rows, counts, temperature, chunk_tokens,
                   return_token_logprobs, extras)


def _varlen_kwargs(model, seq_lens: torch.Tensor) -> dict:
    """Segment boundaries for attentions that skip the masked-out blocks: flash-attention takes them as varlen
    arguments (instead of inferring them from `position_ids` in every layer, which would synchronise the device
    each time), prefpipe's block attention for sdpa (`prefpipe.attention`) as a tuple of blocks."""
    if uses_blocks(model):
        return {BLOCKS_KWARG: packed_blocks(seq_lens.tolist())}
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    if not impl.startswith("flash_attention"):
        return {}
    cu = torch.nn.functional.pad(torch.cumsum(seq_lens, 0, dtype=torch.int32), (1, 0))
    longest = int(seq_lens.max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _summed(model, head, h, targets, rows, counts, temperature, chunk_tokens, return_token_logprobs,
            extras: tuple = ()):
    """Score the selected positions `h` (row-major, row of each in `rows`) through the LM head in chunks and sum
    them per row; the tail of both the padded and the packed path."""
    unknown = set(extras) - {"tokens", "log_sum_sq"}
    if unknown:
        raise ValueError(f"unknown extras {sorted(unknown)}")
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    weight, bias = head.weight, head.bias
    want_sq = "log_sum_sq" in extras
    pieces, sq_pieces = [], []
    for start in range(0, h.shape[0], chunk_tokens):
        args = (h[start:start + chunk_tokens], targets[start:start + chunk_tokens], weight, bias, temperature,
                softcap, want_sq)
        if torch.is_grad_enabled() and h.requires_grad:
            piece = checkpoint(_token_logprobs, *args, use_reentrant=False)
        else:
            piece = _token_logprobs(*args)
        if want_sq:
            piece, sq = piece
            sq_pieces.append(sq)
        pieces.append(piece)
    tok_lp = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)

    # Accumulate in float64: a float32 running sum over hundreds of tokens loses ~1e-4 nats on sums of a few
    # hundred, more than the per-token disagreement between engines; one rounding back to float32 costs 1 ulp.
    n_rows = counts.shape[0]
    sums = torch.zeros(n_rows, dtype=torch.float64, device=h.device).index_add(0, rows, tok_lp.double()).float()
    tokens = list(tok_lp.detach().split(counts.tolist())) if return_token_logprobs else None
    extra = None
    if extras:
        extra = {}
        if "tokens" in extras:
            extra["tokens"] = _padded(tok_lp, rows, counts)
        if want_sq:
            sq = torch.cat(sq_pieces) if sq_pieces else tok_lp.new_zeros(0)
            extra["log_sum_sq"] = _padded(sq, rows, counts)
    return Scores(sums, counts, tokens, extra)
