"""Score prompt+response token ids with a model: the one loop behind precompute's hf backend, verify, eval and
the step-0 drift check.

Decisions a user may want to know:

- Sequences are sorted by length (longest first) and packed into batches of at most `batch_tokens` padded
  tokens, so padding waste stays small on skewed data; results come back in input order. A sequence longer than
  the budget is scored alone.
- Batches are right-padded with an attention mask, which leaves every real token's position and context
  unchanged, so a score does not depend on which rows shared its batch (up to float round-off).
- Only response positions go through the LM head, in float32, in chunks sized from the vocabulary (about 128 MB
  of logits at a time), so memory does not grow with `batch x seq x vocab`.
- Each sum is accumulated in float64 and rounded once to float32 (`prefpipe.logprobs.sequence_logprobs`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from prefpipe.logprobs import pad_batch, sequence_logprobs

# Float32 logits materialised per LM-head chunk; 32 Mi values = 128 MB, whatever the vocabulary.
LOGIT_BUDGET = 32 * 2 ** 20


class Scores(NamedTuple):
    """Per input sequence, in input order: summed response log-prob (a float32 value), scored response tokens,
    and (only with `per_token=True`) the float32 per-token log-probs as a CPU tensor each."""
    sums: list[float]
    counts: list[int]
    tokens: list[torch.Tensor] | None = None


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each group padded to its first (longest) member within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, width = [], [], 0
    for i in order:
        if cur and (len(cur) + 1) * width > batch_tokens:
            batches.append(cur)
            cur = []
        if not cur:
            width = lengths[i]
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def head_chunk_tokens(model) -> int:
    """LM-head rows per chunk so that one chunk's float32 logits stay within LOGIT_BUDGET."""
    return max(16, LOGIT_BUDGET // model.get_output_embeddings().weight.shape[0])


def rows_budget(rows: int, per_row: int, lengths: list[int]) -> int:
    """A token budget for callers that size work in rows: `rows` rows of `per_row` sequences each at the longest
    length, the peak of a fixed-size batch loop over the same sequences."""
    return max(1, rows * per_row * max(lengths, default=1))


def score_sequences(model, prompts: list[list[int]], responses: list[list[int]], *, batch_tokens: int,
                    pad_id: int = 0, chunk_tokens: int | None = None, per_token: bool = False,
                    progress: Callable[[int, int], None] | None = None, device=None) -> Scores:
    """Summed log-probs of each `responses[i]` after `prompts[i]`.

    Args:
        model: a transformers causal LM, scored with `sequence_logprobs`; or a callable
            `(input_ids, attention_mask, prompt_lens) -> (sums, counts)` such as the training `Scorer` module,
            which must be called through its own `forward` under DDP/FSDP. A callable sizes its own LM-head
            chunks; for `per_token` it must take `extras=("tokens",)` as the `Scorer` does.
        batch_tokens: padded tokens per forward (see `length_batches`).
        pad_id: the id written into padding; masked out, so it does not change any score.
        chunk_tokens: LM-head rows per chunk; default `head_chunk_tokens(model)`.
        per_token: also return each sequence's per-token log-probs (`Scores.tokens`).
        progress: called as `progress(sequences, real_tokens)` after each forward.
        device: where the batches go; default the model's first parameter's device.

    Every process that calls this with the same inputs runs the same forwards in the same order, as FSDP needs.
    """
    lm = hasattr(model, "get_output_embeddings")
    if not lm and chunk_tokens is not None:
        raise TypeError("chunk_tokens needs a causal LM, not a scoring callable")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive (got {batch_tokens})")
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    sums: list[float] = [0.0] * len(seqs)
    counts: list[int] = [0] * len(seqs)
    tokens: list[torch.Tensor] | None = [torch.zeros(0)] * len(seqs) if per_token else None
    if not seqs:
        return Scores(sums, counts, tokens)
    if device is None:
        device = next(model.parameters()).device
    if lm and chunk_tokens is None:
        chunk_tokens = head_chunk_tokens(model)
    # A causal LM runs under inference mode, as precompute always has; a training module keeps no_grad, since
    # its parameters are used for training right after and inference-mode tensors cannot enter autograd.
    with torch.inference_mode() if lm else torch.no_grad():
        for batch in length_batches([len(s) for s in seqs], batch_tokens):
            ids, mask = pad_batch([seqs[i] for i in batch], pad_id=pad_id, device=device)
            plens = torch.tensor([len(prompts[i]) for i in batch], dtype=torch.long, device=device)
            toks = None
            if not lm and per_token:
                s, c, ex = model(ids, mask, plens, extras=("tokens",))
                toks = [row[:n] for row, n in zip(ex["tokens"].float(), c.tolist())]
            elif not lm:
                s, c = model(ids, mask, plens)
            elif per_token:
                s, c, toks = sequence_logprobs(model, ids, mask, plens, chunk_tokens=chunk_tokens,
                                               return_token_logprobs=True)
            else:
                s, c = sequence_logprobs(model, ids, mask, plens, chunk_tokens=chunk_tokens)
            for k, (i, sv, cv) in enumerate(zip(batch, s.tolist(), c.tolist())):
                sums[i], counts[i] = sv, cv
                if toks is not None:
                    tokens[i] = toks[k].cpu()
            if progress is not None:
                progress(len(batch), int(mask.sum()))
    return Scores(sums, counts, tokens)
