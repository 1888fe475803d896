"""Padding-free training (`--padding_free`): sequences packed end to end in one row score, train and evaluate
exactly as the padded layout does (float32, 1e-5), in one process and under DDP; models that cannot pack fall
back to padding with a note."""

import os
import subprocess
import sys

import pytest
import torch

from train_fixtures import one_thread  # noqa: F401  (autouse)
from train_fixtures import assert_trajectories_close, cache, metrics, pairs_data, trajectory

ATOL = 1e-5


def plain_logp(model, prompt, response):
    """Summed log-prob of `response` after `prompt` from a full-logits forward of that one sequence alone."""
    ids = torch.tensor([list(prompt) + list(response)])
    logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(logp[p - 1, ids[0, p]] for p in range(len(prompt), ids.shape[1]))


def random_seqs(n, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        plen, rlen = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(0, 14, (1,), generator=g))
        out.append((torch.randint(5, vocab, (plen,), generator=g).tolist(),
                    torch.randint(5, vocab, (rlen,), generator=g).tolist()))
    return out


def packed_inputs(rows):
    seqs = [p + r for p, r in rows]
    ids = torch.tensor([[t for s in seqs for t in s]])
    return ids, torch.tensor([len(p) for p, _ in rows]), torch.tensor([len(s) for s in seqs])


def test_packed_scores_equal_each_sequence_alone(tiny_lm):
    """Eight sequences (one with an empty response) in one packed row against each scored alone with a plain
    forward; counts are the response lengths."""
    from prefpipe.logprobs import sequence_logprobs
    rows = random_seqs(8, seed=3, vocab=tiny_lm.config.vocab_size)
    rows[2] = (rows[2][0], [])
    ids, plens, lens = packed_inputs(rows)
    with torch.no_grad():
        sums, counts, per_tok, _ = sequence_logprobs(tiny_lm, ids, None, plens, seq_lens=lens,
                                                     return_token_logprobs=True)
        want = [float(plain_logp(tiny_lm, p, r)) for p, r in rows]
    assert counts.tolist() == [len(r) for _, r in rows]
    assert [t.numel() for t in per_tok] == counts.tolist()
    for got, w in zip(sums.tolist(), want):
        assert abs(got - w) <= ATOL * max(1.0, abs(w)), (got, w)
    assert sums[2] == 0.0
    assert max(abs(w) for w in want) > 10  # sums large enough that a leak across sequences would show


def test_packed_gradients_equal_padded(tiny_model):
    """The backward of a packed row gives the padded layout's gradients (chunked LM head recomputed in both)."""
    from prefpipe.logprobs import pad_batch, sequence_logprobs
    from prefpipe.modeling import load_model
    lm = load_model(str(tiny_model))
    rows = random_seqs(6, seed=5, vocab=lm.config.vocab_size)
    ids, plens, lens = packed_inputs(rows)
    grads = []
    for packed in (False, True):
        lm.zero_grad()
        if packed:
            sums = sequence_logprobs(lm, ids, None, plens, seq_lens=lens, chunk_tokens=7).sums
        else:
            pids, mask = pad_batch([p + r for p, r in rows], 0)
            sums = sequence_logprobs(lm, pids, mask, plens, chunk_tokens=7).sums
        (sums * torch.linspace(0.5, 1.5, len(rows))).sum().backward()
        grads.append({k: p.grad.clone() for k, p in lm.named_parameters()})
    # Compared at each tensor's scale: the two layouts sum the same float32 products in other orders (other matmul
    # shapes), so elements near zero differ by round-off of the tensor's large elements (~5e-7 of its largest
    # on an AMD EPYC, where an element-wise atol of 1e-6 failed on correct code); a real difference (a token
    # attending across sequences, a lost chunk) moves gradients by far more than 1e-5 of their scale.
    for k in grads[0]:
        a, b = grads[0][k], grads[1][k]
        worst = float((a - b).abs().max())
        assert worst <= 1e-5 * float(a.abs().max()), (k, worst, float(a.abs().max()))


def test_collate_packs_chosen_then_rejected_and_kto_partners(tiny_model, tmp_path_factory):
    """Packed micro-batches hold exactly the padded batch's real tokens, in its order, with per-sequence lengths."""
    from prefpipe.data.cache import read_cache
    from prefpipe.train.batches import collate_rows
    from prefpipe.train.train_data import TrainData
    for name, kto, shape in (("pairs8", False, "pairs"), ("pairs8-kto", True, "examples")):
        c = read_cache(cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 8), name, kto=kto))
        data = TrainData(c.kind, c.table, c.has_reference, "x")
        t = data.table.slice(0, 3)
        padded = collate_rows(t, shape, 0, True)
        packed = collate_rows(t, shape, 0, True, pack=True)
        prompts = t.column("prompt_ids").to_pylist()
        resp_cols = ("chosen_ids", "rejected_ids") if not kto else ("completion_ids",)
        seqs = [p + r for col in resp_cols for p, r in zip(prompts, t.column(col).to_pylist())]
        assert packed.ids.tolist() == [[x for s in seqs for x in s]] and packed.mask is None
        assert packed.seq_lens.tolist() == [len(s) for s in seqs] == padded.mask.sum(-1).tolist()
        assert packed.prompt_lens.tolist() == padded.prompt_lens.tolist()
        assert packed.tokens == padded.tokens and packed.n == padded.n == 3
        assert packed.forward_inputs()[1].keys() == {"seq_lens"} and padded.forward_inputs()[1] == {}
        if kto:
            kl = [p + r for p, r in zip(prompts, t.column("kl_completion_ids").to_pylist())]
            assert packed.kl_ids.tolist() == [[x for s in kl for x in s]]
            assert packed.kl_seq_lens.tolist() == [len(s) for s in kl]
            assert torch.equal(packed.label, padded.label)


def run(out, model, cache_dir, losses, padding_free, **loop):
    from prefpipe.train.config import LoopConfig, OptimConfig, SourceConfig, TrainConfig
    from prefpipe.train.loop import run_training
    cfg = TrainConfig(source=SourceConfig(model=str(model), cache=str(cache_dir)), out=str(out),
                      loss_types=tuple(losses), optim=OptimConfig(lr=1e-3, warmup_ratio=0.25),
                      loop=LoopConfig(**{"max_steps": 6, **loop}, padding_free=padding_free), dtype="float32",
                      device="cpu", progress=False)
    return run_training(cfg)


@pytest.fixture
def count_packed(monkeypatch):
    """How many micro-batches (train and eval) were collated packed, so a test knows the layout was used."""
    import prefpipe.train.batches as tb
    calls = [0]
    real = tb.collate_rows

    def spy(*a, **k):
        calls[0] += bool(k.get("pack") or (len(a) > 5 and a[5]))
        return real(*a, **k)
    monkeypatch.setattr(tb, "collate_rows", spy)
    return calls


@pytest.mark.parametrize("losses,kto", [(("dpo", "ipo", "orpo", "sft"), False), (("kto",), True)])
def test_training_packed_equals_padded(tmp_path, tmp_path_factory, tiny_model, count_packed, losses, kto):
    """Whole runs with gradient accumulation and an eval split: every logged value of every step (loss, rewards,
    margins, grad norm, KTO's z0) and every evaluation agree to 1e-5; pairs and tokens per step are equal."""
    c = cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 24), "pairs24" + ("-kto" if kto else ""),
              kto=kto)
    kw = dict(batch_size=3, grad_accum=2, eval_fraction=0.2, eval_every=3)
    run(tmp_path / "pad", tiny_model, c, losses, False, **kw)
    assert count_packed[0] == 0
    summary = run(tmp_path / "pack", tiny_model, c, losses, True, **kw)
    n_eval = metrics(tmp_path / "pack" / summary["runs"][0]["dir"], "eval")[0]["examples"]
    # every micro-batch was packed: 6 steps x 2 micro-batches, and 2 evaluations of ceil(n_eval / 3) batches
    assert count_packed[0] == len(summary["runs"]) * (6 * 2 + 2 * -(-n_eval // 3))
    keys = ("loss", "acc", "r_chosen", "r_rejected", "margin", "grad_norm", "lr", "kl", "nll", "log_odds")
    for r in summary["runs"]:
        a, b = tmp_path / "pad" / r["dir"], tmp_path / "pack" / r["dir"]
        ta, tb = trajectory(a, keys), trajectory(b, keys)
        ta[0][1] = tb[0][1]  # step-1 acc compares float32 noise around zero margins (see test_train_dist)
        assert_trajectories_close(ta, tb, ATOL)
        ma, mb = metrics(a), metrics(b)
        assert [(x["examples"], x["tokens"]) for x in ma] == [(x["examples"], x["tokens"]) for x in mb]
        assert all(x["examples"] == 6 for x in mb)
        ea, eb = metrics(a, "eval"), metrics(b, "eval")
        assert len(ea) == len(eb) == 2
        assert_trajectories_close([[e.get(k) for k in keys] for e in ea], [[e.get(k) for k in keys] for e in eb],
                                  ATOL)
    assert abs(metrics(tmp_path / "pack" / summary["runs"][0]["dir"])[-1]["loss"]
               - metrics(tmp_path / "pack" / summary["runs"][0]["dir"])[0]["loss"]) > 1e-3  # it trained


def test_model_that_cannot_pack_falls_back_with_a_note(tiny_model, monkeypatch):
    """An attention without packed-mask support is refused statically; one that claims support but lets
    packed sequences see each other is caught by the probe. Either way: padded batches and a note."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from prefpipe.dist import Procs
    from prefpipe.modeling import load_model
    from prefpipe import packing
    from prefpipe.train import parallel

    lm = load_model(str(tiny_model))
    policy = parallel.wrap_policy(lm, Procs(), torch.device("cpu"), fsdp=False)
    assert packing.choose_packing(policy, True, "cpu", log=pytest.fail) is True and policy.packed
    assert packing.choose_packing(policy, False, "cpu", log=pytest.fail) is False and not policy.packed

    # a custom attention gets no mask from transformers (sdpa then runs causal over the whole packed row)
    AttentionInterface.register("leaky_test", sdpa_attention_forward)
    lm.set_attn_implementation("leaky_test")
    notes = []
    assert packing.choose_packing(policy, True, "cpu", log=notes.append) is False and not policy.packed
    assert "padded" in notes[0] and "'leaky_test'" in notes[0]
    monkeypatch.setattr(packing, "PACKING_ATTENTION", packing.PACKING_ATTENTION + ("leaky_test",))
    problem = packing.packing_problem(policy.scorer, lm, "cpu")
    assert problem is not None and "differ" in problem


@pytest.mark.slow
def test_ddp_packed_matches_single_process_padded(tmp_path, tmp_path_factory, tiny_model):
    """torchrun, 2 processes (gloo), packed, 2 x batch 1 x accumulation 2 against one padded process with
    batch 4: the same trajectory (1e-5) and 4 pairs per step."""
    c = cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 24), "pairs24")
    run(tmp_path / "one", tiny_model, c, ("dpo",), False, batch_size=4, max_steps=8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "prefpipe",
           "train", "--model", str(tiny_model), "--cache", str(c), "--batch_size", "1", "--grad_accum", "2",
           "--out", str(tmp_path / "two"), "--lr", "1e-3", "--max_steps", "8", "--warmup_ratio", "0.25",
           "--dtype", "float32", "--device", "cpu", "--no_progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ddp on 2 process(es)" in proc.stderr and "padded batches" not in proc.stderr
    a, b = trajectory(tmp_path / "one" / "dpo-beta0.1"), trajectory(tmp_path / "two" / "dpo-beta0.1")
    a[0][1] = b[0][1] = 0.0  # step-1 acc: float32 noise around zero margins in both
    assert_trajectories_close(a, b, ATOL)
    assert all(r["examples"] == 4 for r in metrics(tmp_path / "two" / "dpo-beta0.1"))
