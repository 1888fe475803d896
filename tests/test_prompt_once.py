"""Prompt-once scoring (`score_pairs`, the hf backend's default) against the separate forwards it replaces, and
against float64 arithmetic that shares nothing with either; the cache paths that read it back streamed."""

from __future__ import annotations

import math
import random

import pyarrow as pa
import pytest
import torch

from helpers import make_pairs, make_unpaired, write_jsonl
from prefpipe.data.cache import read_cache
from prefpipe.modeling import load_model
from prefpipe.packing import prompt_once_supported
from prefpipe.scoring import _packed_row, score_pairs, score_sequences


@pytest.fixture(scope="module")
def lm(tiny_lm):
    torch.set_flush_denormal(True)
    return tiny_lm.float().eval()


def triples(n=14, seed=0, vocab=300):
    """Mixed lengths: prompts 1-25 tokens, responses 1-50, including one-token responses."""
    rng = random.Random(seed)
    draw = lambda lo, hi: [rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [draw(1, 25) for _ in range(n)], [draw(1, 50) for _ in range(n)], [draw(1, 50) for _ in range(n)]


@pytest.fixture(scope="module")
def lm64(tiny_model):
    return load_model(str(tiny_model), dtype=torch.float64).eval()


def float64_tokens(lm64, prompt, response):
    """Prompt + response alone, float64 weights, full logits: the per-token log-probs by definition."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        lp = lm64(input_ids=ids).logits[0].log_softmax(-1)
    return [lp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])]


def test_packed_layout_by_hand():
    """prompt [5, 6], first [7], second [8, 9], then the next pair, end to end without padding: positions
    restart at 2 for the second response; prompt + first form one causal block, the second response a block
    whose keys are the prompt and itself (not the first response)."""
    ids, pos, blocks, src, tgt, seq = _packed_row([[5, 6], [1]], [[7], [2]], [[8, 9], [3]], [0, 1], "cpu")
    assert ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3]]
    assert pos.tolist() == [[0, 1, 2, 2, 3, 0, 1, 1]]
    assert blocks == ((0, 3, 0, 0), (3, 5, 0, 2), (5, 7, 5, 5), (7, 8, 5, 6))
    # Pair 0: token 7 from state 1; 8 from state 1 (the prompt's end), 9 from state 3. Pair 1 starts at 5: token 2
    # from state 5, token 3 from state 5 as well.
    assert src.tolist() == [1, 1, 3, 5, 5] and tgt.tolist() == [2, 3, 4, 6, 7] and seq.tolist() == [0, 1, 1, 2, 3]


@pytest.mark.parametrize("budget", [60, 10_000])
def test_sums_and_tokens_equal_separate_forwards(lm, lm64, budget):
    prompts, firsts, seconds = triples()
    got = score_pairs(lm, prompts, firsts, seconds, batch_tokens=budget, per_token=True)
    want = score_sequences(lm, prompts + prompts, firsts + seconds, batch_tokens=budget, per_token=True)
    assert got.counts == want.counts == [len(r) for r in firsts + seconds]
    for s, w, toks, wtoks in zip(got.sums, want.sums, got.tokens, want.tokens):
        assert len(toks) == len(wtoks)
        assert float((toks - wtoks).abs().max()) <= 1e-5
        assert abs(s - w) <= 1e-5 * len(toks)
        # the sum is the float64 sum of its own float32 per-token values, rounded once
        assert s == float(torch.tensor(math.fsum(toks.double().tolist()), dtype=torch.float32))
    # and both against float64 arithmetic, on a few rows
    for i in (0, 3, len(prompts) - 1):
        for toks, resp in ((got.tokens[i], firsts[i]), (got.tokens[len(prompts) + i], seconds[i])):
            ref = float64_tokens(lm64, prompts[i], resp)
            assert max(abs(a - b) for a, b in zip(toks.tolist(), ref)) < 1e-4


def test_the_first_response_is_hidden_from_the_second(lm):
    prompts, firsts, seconds = triples(6, seed=1)
    base = score_pairs(lm, prompts, firsts, seconds, batch_tokens=10_000)
    other = [[(t * 7 + 3) % 299 + 1 for t in r] for r in firsts]
    changed = score_pairs(lm, prompts, other, seconds, batch_tokens=10_000)
    n = len(prompts)
    assert changed.sums[n:] == pytest.approx(base.sums[n:], abs=1e-5)  # the seconds did not move
    assert max(abs(a - b) for a, b in zip(changed.sums[:n], base.sums[:n])) > 0.1  # the firsts did
    # and changing the seconds leaves the firsts alone
    again = score_pairs(lm, prompts, firsts, other, batch_tokens=10_000)
    assert again.sums[:n] == pytest.approx(base.sums[:n], abs=1e-5)


def test_progress_counts_tokens_like_separate_forwards(lm):
    prompts, firsts, seconds = triples(5, seed=2)
    calls = []
    score_pairs(lm, prompts, firsts, seconds, batch_tokens=80, progress=lambda n, t: calls.append((n, t)))
    assert sum(n for n, _ in calls) == 10
    assert sum(t for _, t in calls) == sum(2 * len(p) + len(a) + len(b) for p, a, b in zip(prompts, firsts, seconds))


def test_probe_accepts_the_tiny_llama_and_refuses_other_attention(lm):
    assert prompt_once_supported(lm) is None
    impl = lm.config._attn_implementation
    try:
        lm.config._attn_implementation = "flash_attention_2"
        assert "'flash_attention_2' is not prefpipe's block attention" in prompt_once_supported(lm)
    finally:
        lm.config._attn_implementation = impl


def test_probe_refuses_a_model_that_drops_the_blocks(tiny_model, monkeypatch):
    """A decoder that does not hand the blocks down to its attention would score the second response without
    its prompt (transformers' mask from the position ids starts a new sequence there); the probe sees that."""
    from prefpipe import attention
    lm = load_model(str(tiny_model)).eval()
    real = attention._forward
    monkeypatch.setattr(attention, "_forward", lambda *a, prefpipe_blocks=None, **k: real(*a, **k))
    attention._register()
    try:
        assert "probe scores differ" in prompt_once_supported(lm)
    finally:
        monkeypatch.undo()
        attention._register()


def test_eager_attention_scores_each_response_separately(tiny_model, tmp_path):
    """Eager attention is not switched to block attention, so the backend warns and uses separate forwards."""
    from transformers import AutoModelForCausalLM

    from prefpipe.precompute.backend import BackendOptions
    from prefpipe.precompute.hf_backend import HFBackend
    eager = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    assert "'eager' is not prefpipe's block attention" in prompt_once_supported(eager)
    with pytest.warns(UserWarning, match="scoring each response in its own forward"):
        backend = HFBackend(BackendOptions(model=str(tiny_model), device="cpu", dtype="float32"), model=eager)
    assert backend.prompt_once is False and eager.config._attn_implementation == "eager"


def precompute(run_cli, tiny_model, data, out, *extra):
    res = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", out, "--part_rows", "5",
                  "--no_progress", *extra)
    assert res.exit_code == 0, res.output
    return read_cache(out)


def assert_close_per_token(a: pa.Table, b: pa.Table, ref_cols, len_cols):
    for col, lcol in zip(ref_cols, len_cols):
        for x, y, n in zip(a.column(col).to_pylist(), b.column(col).to_pylist(), b.column(lcol).to_pylist()):
            n = n if isinstance(n, int) else len(n)
            assert abs(x - y) <= 1e-5 * n, (col, x, y)


def test_paired_cache_with_truncation_equals_the_old_path(tmp_path, run_cli, tiny_model, lm64):
    data = write_jsonl(tmp_path / "p.jsonl", make_pairs(12, seed=5, max_words=60))
    trunc = ("--max_length", "40", "--max_prompt_length", "12")
    new = precompute(run_cli, tiny_model, data, tmp_path / "new", *trunc)
    old = precompute(run_cli, tiny_model, data, tmp_path / "old", *trunc, "--no_prompt_once")
    assert new.metadata["backend"]["prompt_once"] is True and old.metadata["backend"]["prompt_once"] is False
    c = new.metadata["counts"]
    assert c["prompt_truncated"] > 0 and c["response_truncated"] > 0  # truncation really happened
    assert c == old.metadata["counts"]
    assert new.table.column("chosen_ids").to_pylist() == old.table.column("chosen_ids").to_pylist()
    assert_close_per_token(new.table, old.table, ("ref_chosen", "ref_rejected"), ("chosen_len", "rejected_len"))
    t = new.table.to_pydict()
    for i in (0, 7):
        want = math.fsum(float64_tokens(lm64, t["prompt_ids"][i], t["rejected_ids"][i]))
        assert abs(t["ref_rejected"][i] - want) <= 1e-5 * len(t["rejected_ids"][i]) + 1e-5


def test_kto_partners_equal_the_old_path(tmp_path, run_cli, tiny_model):
    data = write_jsonl(tmp_path / "u.jsonl", make_unpaired(11, seed=6, max_words=40))
    trunc = ("--max_length", "48", "--max_prompt_length", "20")
    new = precompute(run_cli, tiny_model, data, tmp_path / "new", *trunc)
    old = precompute(run_cli, tiny_model, data, tmp_path / "old", *trunc, "--no_prompt_once")
    assert new.kind == "unpaired" and new.metadata["counts"]["kl_truncated"] > 0
    assert new.table.column("kl_completion_ids").to_pylist() == old.table.column("kl_completion_ids").to_pylist()
    assert_close_per_token(new.table, old.table, ("ref_logp", "ref_kl"), ("completion_len", "kl_completion_ids"))


# ---------------------------------------------------------------- a million rows: reading streamed

def test_memory_mapped_cache_inspect_and_split_on_a_multi_part_cache(tmp_path, run_cli, tiny_model):
    import hashlib
    import statistics

    from prefpipe.precompute.report import inspect_lines
    from prefpipe.train.order import Order
    from prefpipe.train.train_data import TrainData, split_eval

    data = write_jsonl(tmp_path / "p.jsonl", make_pairs(23, seed=7))
    plain = precompute(run_cli, tiny_model, data, tmp_path / "c")  # 5 parts of 5, 5, 5, 5, 3 rows
    mapped = read_cache(tmp_path / "c", memory_map=True)
    assert len(mapped.table.column("row_id").chunks) == 5 and mapped.table.equals(plain.table)
    assert mapped.table.take(pa.array([22, 0])).to_pydict() == plain.table.take(pa.array([22, 0])).to_pydict()

    lines = inspect_lines(mapped)
    assert lines == inspect_lines(plain) and "rows: 23" in lines
    t = plain.table.to_pydict()
    stats = {ln.split()[0]: [float(x) for x in ln.split()[1:]] for ln in lines[lines.index("token lengths:") + 2:][:3]}
    for name, col in (("prompt", "prompt_ids"), ("chosen", "chosen_ids"), ("rejected", "rejected_ids")):
        lens = [len(x) for x in t[col]]
        mean, std, lo, _, _, hi = stats[name]
        assert (lo, hi) == (min(lens), max(lens))
        assert mean == pytest.approx(statistics.mean(lens), rel=1e-3)
        assert std == pytest.approx(statistics.stdev(lens), rel=1e-3)
    diff = next(ln for ln in lines if ln.strip().startswith("chosen - rejected")).split()
    d = [a - b for a, b in zip(t["ref_chosen"], t["ref_rejected"])]
    assert float(diff[3]) == pytest.approx(statistics.mean(d), rel=1e-3)

    # The eval split by its documented rule: groups sorted by sha256("eval\x1f" + base id) hex digest.
    td = TrainData("paired", mapped.table, True, "c")
    train, held = split_eval(td, 0.25)
    order = sorted(t["row_id"], key=lambda b: hashlib.sha256(f"eval\x1f{b}".encode()).hexdigest())
    want_held = sorted(t["row_id"].index(b) for b in order[:round(0.25 * 23)])
    assert held == want_held and train.tolist() == [i for i in range(23) if i not in want_held]
    o = Order(train, 4, seed=3)
    assert o.steps_per_epoch == 4
    seen = [r for s in range(4) for r in o.global_rows(s)]
    assert len(set(seen)) == 16 and set(seen) <= set(train.tolist()) and all(type(r) is int for r in seen)
