"""`score_sequences` against arithmetic that shares nothing with it, and against the batching precompute has
always used (the hf backend's cached sums must not move by a bit)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from prefpipe.logprobs import pad_batch, sequence_logprobs
from prefpipe.scoring import LOGIT_BUDGET, head_chunk_tokens, length_batches, score_sequences


def rows(n=12, seed=0, vocab=200):
    """Mixed lengths: prompts 1-20 tokens, responses 1-60, so batches hold real padding."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 20))] for _ in range(n)]
    responses = [[rng.randrange(vocab) for _ in range(rng.randint(1, 60))] for _ in range(n)]
    return prompts, responses


def float64_per_row(lm, prompts, responses):
    """One row at a time, unpadded, a float64 copy of the weights, full logits: per-token log-probs."""
    import copy
    lm64 = copy.deepcopy(lm).double()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            logp = lm64(input_ids=ids).logits[0].log_softmax(-1)
            out.append([logp[t - 1, ids[0, t]].item() for t in range(len(p), len(p) + len(r))])
    return out


@pytest.fixture(scope="module")
def lm(tiny_lm):
    torch.set_flush_denormal(True)
    return tiny_lm.float().eval()


def test_sums_counts_and_tokens_match_float64_recomputation_under_a_tight_budget(lm):
    prompts, responses = rows()
    calls = []
    scores = score_sequences(lm, prompts, responses, batch_tokens=90, per_token=True,
                             progress=lambda n, tok: calls.append((n, tok)))
    # 90 tokens for sequences of up to 80: most batches hold one or two rows, so there are many of them.
    assert len(calls) >= 8 and sum(n for n, _ in calls) == len(prompts)
    assert sum(tok for _, tok in calls) == sum(len(p) + len(r) for p, r in zip(prompts, responses))
    want = float64_per_row(lm, prompts, responses)
    assert scores.counts == [len(r) for r in responses]
    for s, toks, w in zip(scores.sums, scores.tokens, want):
        assert len(toks) == len(w)
        # float32 forward vs float64: ~1e-6 per token; an off-by-one position would be off by whole nats.
        assert max(abs(a - b) for a, b in zip(toks.tolist(), w)) < 1e-4
        assert abs(s - math.fsum(w)) <= 1e-6 * abs(math.fsum(w)) + 1e-4, (s, math.fsum(w))
        # the sum is the float64 sum of the float32 per-token values, rounded once to float32
        assert s == float(torch.tensor(math.fsum(toks.double().tolist()), dtype=torch.float32))
    assert min(abs(math.fsum(w)) for w in want) > 3  # sums of real size


def test_input_order_is_kept(lm):
    prompts, responses = rows(8, seed=1)
    fwd = score_sequences(lm, prompts, responses, batch_tokens=120)
    rev = score_sequences(lm, prompts[::-1], responses[::-1], batch_tokens=120)
    assert rev.sums[::-1] == pytest.approx(fwd.sums, rel=1e-6, abs=1e-5)
    assert rev.counts[::-1] == fwd.counts == [len(r) for r in responses]
    assert fwd.tokens is None
    assert score_sequences(lm, [], [], batch_tokens=10) == ([], [], None, None)


def test_bit_identical_to_the_batching_precompute_always_used(lm):
    """Length-sorted batches, right padding with id 0, LM-head chunks sized from the vocabulary: one direct
    `sequence_logprobs` call per batch gives exactly the same float32 values."""
    prompts, responses = rows(10, seed=2)
    budget = 150
    got = score_sequences(lm, prompts, responses, batch_tokens=budget)
    vocab = lm.get_output_embeddings().weight.shape[0]
    chunk = max(16, LOGIT_BUDGET // vocab)
    assert head_chunk_tokens(lm) == chunk
    want = [None] * len(prompts)
    seqs = [p + r for p, r in zip(prompts, responses)]
    with torch.inference_mode():
        for batch in length_batches([len(s) for s in seqs], budget):
            ids, mask = pad_batch([seqs[i] for i in batch], 0)
            plens = torch.tensor([len(prompts[i]) for i in batch])
            s = sequence_logprobs(lm, ids, mask, plens, chunk_tokens=chunk).sums
            for i, v in zip(batch, s.tolist()):
                want[i] = v
    assert got.sums == want


def test_a_scoring_callable_is_called_through_its_forward(lm):
    """The training `Scorer` path: a module whose forward returns (sums, counts), scored without gradients."""
    from prefpipe.train.parallel import Scorer
    prompts, responses = rows(6, seed=3)
    scorer = Scorer(lm)
    seen = []
    scorer.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    got = score_sequences(scorer, prompts, responses, batch_tokens=100, device=torch.device("cpu"))
    assert sum(seen) == len(prompts) and len(seen) > 1
    want = score_sequences(lm, prompts, responses, batch_tokens=100, chunk_tokens=1024)
    assert got.sums == pytest.approx(want.sums, rel=1e-6, abs=1e-5) and got.counts == want.counts
    with pytest.raises(TypeError):
        score_sequences(scorer, prompts, responses, batch_tokens=100, chunk_tokens=64)
    # per-token values through the module's forward (the drift check's worst token) match the LM's own
    tok = score_sequences(scorer, prompts, responses, batch_tokens=100, per_token=True, device=torch.device("cpu"))
    ref = score_sequences(lm, prompts, responses, batch_tokens=100, per_token=True)
    for a, b, r in zip(tok.tokens, ref.tokens, responses):
        assert a.shape == (len(r),) and torch.allclose(a, b, atol=1e-5)
