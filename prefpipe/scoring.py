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

from collections.abc import Callable

import torch

from prefpipe.attention import BLOCKS_KWARG, prefix_blocks
from prefpipe.data.cache import KINDS
from prefpipe.logprobs import pad_batch, row_logprobs, sequence_logprobs
from prefpipe.scores import Scores

# Float32 logits materialised per LM-head chunk; 32 Mi values = 128 MB, whatever the vocabulary.
LOGIT_BUDGET = 32 * 2 ** 20


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


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices longest first, grouped so that each group's summed length stays within `batch_tokens` (for rows
    packed without padding)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, used = [], [], 0
    for i in order:
        if cur and used + lengths[i] > batch_tokens:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
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
            if not lm:
                out = model(ids, mask, plens, extras=("tokens",) if per_token else ())
                if per_token:
                    toks = [row[:n] for row, n in zip(out.extras["tokens"].float(), out.counts.tolist())]
            else:
                out = sequence_logprobs(model, ids, mask, plens, chunk_tokens=chunk_tokens,
                                        return_token_logprobs=per_token)
                toks = out.tokens
            s, c = out.sums, out.counts
            for k, (i, sv, cv) in enumerate(zip(batch, s.tolist(), c.tolist())):
                sums[i], counts[i] = sv, cv
                if toks is not None:
                    tokens[i] = toks[k].cpu()
            if progress is not None:
                progress(len(batch), int(mask.sum()))
    return Scores(sums, counts, tokens)


# ---------------------------------------------------------------- prompt once: both responses in one row

def _packed_row(prompts, firsts, seconds, batch: list[int], device):
    """Rows `prompt + first + second` of `batch` laid end to end in one unpadded row, with the position ids and
    attention blocks (`prefpipe.attention.prefix_blocks`) that make the second response see the prompt but not the
    first, as if it had been scored after the prompt alone.

    Returns (ids [1, T], positions [1, T], blocks, src [N], tgt [N], seq [N]): the index of the hidden state that
    predicts each scored token, the token's index, and the output sequence it belongs to (2 * k for the first
    response of batch row k, 2 * k + 1 for the second)."""
    ids, pos, src, tgt, seq, layout, base = [], [], [], [], [], [], 0
    for k, i in enumerate(batch):
        p, a, b = len(prompts[i]), len(firsts[i]), len(seconds[i])
        ids += [*prompts[i], *firsts[i], *seconds[i]]
        pos += [*range(p + a), *range(p, p + b)]  # the second response continues from the prompt's end
        src += range(base + p - 1, base + p + a - 1)
        tgt += range(base + p, base + p + a)
        seq += [2 * k] * a
        if b:
            # The second response's first token is predicted by the prompt's last state, not the first's.
            src += [base + p - 1, *range(base + p + a, base + p + a + b - 1)]
            tgt += range(base + p + a, base + p + a + b)
            seq += [2 * k + 1] * b
        layout.append((p, a, b))
        base += p + a + b
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return as_long([ids]), as_long([pos]), prefix_blocks(layout), as_long(src), as_long(tgt), as_long(seq)


def score_pairs(model, prompts: list[list[int]], firsts: list[list[int]], seconds: list[list[int]], *,
                batch_tokens: int, chunk_tokens: int | None = None, per_token: bool = False,
                progress: Callable[[int, int], None] | None = None, device=None) -> Scores:
    """`score_sequences(model, prompts + prompts, firsts + seconds)`, running each prompt once.

    Each pair becomes `prompt + first + second`; the second response's positions restart at `len(prompt)` and
    prefpipe's block attention (`prefpipe.attention`) lets it see the prompt but not the first response, so both
    scores equal the separate forwards up to float round-off (about 1e-6 per token in float32). Pairs, longest
    first, are laid end to end without padding into rows of at most `batch_tokens` tokens (a longer pair gets a
    row of its own). Results come back as `score_sequences` would give them: all firsts, then all seconds.
    `progress(sequences, tokens)` counts tokens as the separate forwards would (the prompt once per response), so
    rates compare across paths. Needs a model with block attention (`prompt_once_supported`)."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive (got {batch_tokens})")
    n = len(prompts)
    if not (len(firsts) == len(seconds) == n):
        raise ValueError("prompts, firsts and seconds must have the same length")
    if any(len(p) < 1 for p in prompts):
        raise ValueError("every row needs at least one prompt token")
    sums, counts = [0.0] * (2 * n), [0] * (2 * n)
    tokens = [torch.zeros(0)] * (2 * n) if per_token else None
    if not n:
        return Scores(sums, counts, tokens)
    device = device if device is not None else next(model.parameters()).device
    chunk_tokens = chunk_tokens or head_chunk_tokens(model)
    lengths = [len(p) + len(a) + len(b) for p, a, b in zip(prompts, firsts, seconds)]
    with torch.inference_mode():
        for batch in token_batches(lengths, batch_tokens):
            ids, pos, blocks, src, tgt, seq = _packed_row(prompts, firsts, seconds, batch, device)
            lens = torch.tensor([len(r[i]) for i in batch for r in (firsts, seconds)], device=device)
            out = row_logprobs(model, ids, pos, {BLOCKS_KWARG: blocks}, src, tgt, seq, lens,
                               chunk_tokens=chunk_tokens, return_token_logprobs=per_token)
            s, c = out.sums.tolist(), out.counts.tolist()
            for k, i in enumerate(batch):  # output row 2k is pair i's first response, 2k + 1 its second
                for j, dest in ((0, i), (1, n + i)):
                    sums[dest], counts[dest] = s[2 * k + j], c[2 * k + j]
                    if per_token:
                        tokens[dest] = out.tokens[2 * k + j].cpu()
            if progress is not None:
                progress(2 * len(batch), sum(2 * len(prompts[i]) + len(firsts[i]) + len(seconds[i]) for i in batch))
    return Scores(sums, counts, tokens)


# ---------------------------------------------------------------- the responses of cache rows

def score_cache_rows(column: Callable[[str], list], kind: str, score: Callable, pairs: Callable | None = None
                     ) -> dict[str, Scores]:
    """Every response of some cache rows (chosen and rejected; a KTO completion and its partner) scored after its
    row's prompt in one call, and the scores split back per response, by descriptor name (`data.cache.KINDS`).

    `column(name)` gives a column of the rows as a list (a dict of columns, or a table's column); `score(prompts,
    responses) -> Scores` scores flat lists; `pairs(prompts, firsts, seconds) -> Scores`, when given and the kind
    has two responses, is used instead (a backend's `score_pairs`: the shared prompt can run once). Precompute,
    the step-0 drift check, held-out evaluation and verify all score cache rows through here."""
    prompts = column("prompt_ids")
    responses = {r.name: column(r.ids) for r in KINDS[kind].responses}
    n = len(prompts)
    if pairs is not None and len(responses) == 2:
        out = pairs(prompts, *responses.values())
    else:
        out = score(prompts * len(responses), [x for ids in responses.values() for x in ids])
    return {name: out.part(j * n, (j + 1) * n) for j, name in enumerate(responses)}

