"""The hf scoring backend against independent float64 arithmetic, and its batching and memory behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import make_pairs
from prefpipe.data.formats import Record
from prefpipe.data.tokenize import PairTokenizer, TokenizeSettings, TokenStats
from prefpipe.modeling import load_model
from prefpipe.precompute.backend import BackendOptions
from prefpipe.precompute.hf_backend import HFBackend
from prefpipe.scoring import length_batches


def tokenized_pairs(tokenizer, n=8, max_words=60):
    recs = [Record(f"r{i}", "mem", i + 1, r["prompt"], chosen=r["chosen"], rejected=r["rejected"],
                   content_hash=f"h{i}") for i, r in enumerate(make_pairs(n, seed=3, max_words=max_words))]
    cols = PairTokenizer(tokenizer, TokenizeSettings(512, 256)).tokenize(recs, TokenStats(), True)
    return cols["prompt_ids"], cols["chosen_ids"]


def naive_float64(model64, prompts, responses):
    """One row at a time, unpadded, float64 weights, full-vocabulary log-softmax: nothing shared with the code."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            lp = model64(input_ids=ids).logits[0].double().log_softmax(-1)
            out.append(sum(lp[t - 1, ids[0, t]].item() for t in range(len(p), len(p) + len(r))))
    return out


@pytest.fixture(scope="module")
def backend(tiny_model):
    torch.set_flush_denormal(True)
    return HFBackend(BackendOptions(str(tiny_model), dtype="float32", device="cpu", batch_tokens=1 << 20))


@pytest.fixture(scope="module")
def model64(tiny_model):
    return load_model(str(tiny_model), dtype=torch.float64).eval()


def test_sums_match_naive_float64(backend, model64, tiny_tokenizer):
    prompts, responses = tokenized_pairs(tiny_tokenizer)
    sums, counts = backend.score(prompts, responses)[:2]
    expected = naive_float64(model64, prompts, responses)
    assert counts == [len(r) for r in responses]
    for got, want in zip(sums, expected):
        # float32 forward vs float64: ~1e-7 relative per token; an off-by-one position would be nats off.
        assert abs(got - want) <= 1e-6 * abs(want) + 1e-5, (got, want)
    assert min(abs(w) for w in expected) > 20  # the comparison is over sums of real size


def test_chunked_lm_head_matches_naive(backend, model64, tiny_tokenizer):
    prompts, responses = tokenized_pairs(tiny_tokenizer, n=4)
    old = backend.chunk_tokens
    backend.chunk_tokens = 7  # many chunk boundaries inside and across rows
    try:
        sums = backend.score(prompts, responses).sums
    finally:
        backend.chunk_tokens = old
    for got, want in zip(sums, naive_float64(model64, prompts, responses)):
        assert abs(got - want) <= 1e-6 * abs(want) + 1e-5


def test_scores_do_not_depend_on_batch_composition(backend, tiny_tokenizer):
    prompts, responses = tokenized_pairs(tiny_tokenizer)
    assert len({len(p) + len(r) for p, r in zip(prompts, responses)}) > 5  # mixed lengths, so real padding
    mixed = backend.score(prompts, responses).sums  # one padded batch
    alone = [backend.score([p], [r]).sums[0] for p, r in zip(prompts, responses)]  # unpadded
    for a, b in zip(mixed, alone):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b) / 100), (a, b)  # ~1e-5 per 100 nats


def test_results_come_back_in_input_order(backend, tiny_tokenizer):
    prompts, responses = tokenized_pairs(tiny_tokenizer, n=6)
    sums = backend.score(prompts, responses).sums
    rev = backend.score(prompts[::-1], responses[::-1]).sums
    assert rev[::-1] == pytest.approx(sums, rel=1e-6)
    assert backend.score([], []) == ([], [], None, None)


def test_length_batches_respect_the_token_budget():
    lengths = [5, 100, 7, 30, 30, 64, 2, 300, 9]
    batches = length_batches(lengths, batch_tokens=128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert width * len(b) <= 128 or len(b) == 1  # an over-long row goes alone
        assert lengths[b[0]] == width
    # By hand: longest first; the 300-token row alone; 64+30 fill 2 x 64 = 128 exactly.
    assert batches == [[7], [1], [5, 3], [4, 8, 2, 0], [6]]


def test_150k_vocab_peak_memory_is_bounded(tmp_path):
    """4 rows x 312 tokens with a 150k vocabulary: full float32 logits would be 750 MB, 1.5 GB with the log-softmax."""
    script = textwrap.dedent("""
        import json, resource, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        from prefpipe.precompute.backend import BackendOptions
        from prefpipe.precompute.hf_backend import HFBackend
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=150_000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=32)
        model = LlamaForCausalLM(cfg)
        be = HFBackend(BackendOptions("unused", dtype="float32", device="cpu", batch_tokens=4 * 312), model=model)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 150_000, (12,), generator=g).tolist() for _ in range(4)]
        resp = [torch.randint(0, 150_000, (300,), generator=g).tolist() for _ in range(4)]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sums, counts = be.score(prompts, resp)[:2]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"delta_mb": (after - before) / 1024, "counts": counts, "mean": sum(sums) / 4 / 300}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["counts"] == [300] * 4
    # A near-uniform random model: per-token log-prob close to -ln(150000) = -11.92.
    assert -13.5 < out["mean"] < -10.5
    print(out)
    assert out["delta_mb"] < 450, out




def test_a_backend_that_implements_only_score_writes_the_cache_float64_agrees_with(tiny_model, tmp_path, run_cli,
                                                                                  monkeypatch):
    from helpers import write_jsonl
    from prefpipe.data.cache import read_cache
    from prefpipe.precompute import run as precompute_run
    from prefpipe.precompute.backend import Backend
    from prefpipe.scoring import score_sequences

    calls = []

    class Plain(Backend):
        name = "hf"  # it takes the registry entry `--backend hf` resolves to: the driver needs nothing else of it

        def __init__(self, options):
            super().__init__(options)
            self.model = load_model(options.model).eval()

        @staticmethod
        def numerics(options):
            return "float32", None

        def provenance(self):
            return {"name": self.name, "version": "0", "dtype": "float32"}

        def score(self, prompts, responses, *, per_token=False, progress=None):
            calls.append(len(prompts))
            out = score_sequences(self.model, prompts, responses, batch_tokens=4096, progress=progress)
            return out

    from prefpipe.precompute import plan
    monkeypatch.setattr(precompute_run, "make_backend", lambda name, options: Plain(options))
    monkeypatch.setattr(plan, "backend_class", lambda name: Plain)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(6, seed=4))
    r = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert calls == [12]  # both responses of the 6 rows through `score` in one call (the base's score_pairs)
    t = read_cache(tmp_path / "cache").table
    model64 = load_model(str(tiny_model)).double().eval()
    for col, ref in (("chosen_ids", "ref_chosen"), ("rejected_ids", "ref_rejected")):
        want = naive_float64(model64, t.column("prompt_ids").to_pylist(), t.column(col).to_pylist())
        assert t.column(ref).to_pylist() == pytest.approx(want, abs=2e-4)
