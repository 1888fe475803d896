"""`train_step` called directly on the tiny model with hand-made micro-batches, against float64 recomputation;
and the training DataLoader against the documented data order."""

import math
import random

import pytest
import torch

from train_fixtures import one_thread  # noqa: F401  (autouse)

LR, LR_FACTOR = 1e-2, 0.5


def f64_logp(model, prompt, response):
    """Summed log-prob of `response` after `prompt`: a plain full-logits forward, nothing from prefpipe."""
    ids = torch.tensor([list(prompt) + list(response)])
    logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logp[p - 1, ids[0, p]] for p in range(len(prompt), len(prompt) + len(response)))


def hand_batch(prompts, responses, ref, extra=None):
    """A Batch built by hand: each prompt repeated for each response list, right-padded with 0."""
    from prefpipe.train.batches import Batch
    n = len(prompts)
    seqs = [p + r for rs in responses for p, r in zip(prompts, rs)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    plens = torch.tensor([len(p) for p in prompts] * len(responses))
    return Batch(ids, mask, plens, n, {k: torch.tensor(v, dtype=torch.float32) for k, v in ref.items()},
                 tokens=sum(map(len, seqs)), **(extra or {}))


def random_rows(n, seed):
    rng = random.Random(seed)
    seq = lambda lo, hi: [rng.randrange(4, 200) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return [(seq(2, 6), seq(1, 7), seq(1, 7)) for _ in range(n)]


def trainer(tiny_model):
    from prefpipe.dist import Procs
    from prefpipe.modeling import load_model
    from prefpipe.train.parallel import wrap_policy
    lm = load_model(str(tiny_model), torch.float32, torch.device("cpu"))
    lm.train()
    policy = wrap_policy(lm, Procs(), torch.device("cpu"), fsdp=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: LR_FACTOR)
    return lm, policy, opt, sched


def assert_first_adamw_step(before, lm, grads64, lr):
    """AdamW's first step (no weight decay) is `-lr * g / (|g| + eps)` per element (both moments bias-corrected
    to g and g^2). Elements whose float64 gradient is float32 noise may take either sign; they move by <= lr."""
    checked = 0
    for name, p in lm.named_parameters():
        moved = (p.detach().double() - before[name].double())
        g = grads64[name]
        want = -lr * g / (g.abs() + 1e-8)
        # above 1e-5 a float32 gradient's relative error barely moves g / (|g| + eps); 1.5e-7 is float32
        # rounding of weights up to 1.0 (3e-5 of this lr)
        clear = g.abs() > 1e-5
        assert torch.allclose(moved[clear], want[clear], rtol=0, atol=1.5e-7), name
        assert bool((moved[~clear].abs() <= lr * (1 + 1e-5) + 1e-7).all()), name
        checked += int(clear.sum())
    assert checked > 1000


def test_train_step_dpo_two_micro_batches_matches_float64(tiny_model):
    """Two micro-batches of 2 pairs (accumulation) against one float64 DPO loss over all 4."""
    from prefpipe.data.cache import PAIRED
    from prefpipe.dist import Procs
    from prefpipe.modeling import load_model
    from prefpipe.train.config import LossConfig
    from prefpipe.train.step import train_step

    beta, eps = 0.5, 0.1
    rows = random_rows(4, seed=1)
    m64 = load_model(str(tiny_model), dtype=torch.float64)
    with torch.no_grad():
        # a reference away from the policy, so the step-0 loss is not ln 2 and the margins are not 0
        offsets = [(-3.0, 1.5), (2.0, -1.0), (0.5, 0.25), (-1.0, -2.0)]
        refs = [(float(f64_logp(m64, p, c)) + a, float(f64_logp(m64, p, r)) + b)
                for (p, c, r), (a, b) in zip(rows, offsets)]
    batches = [hand_batch([p for p, _, _ in part], [[c for _, c, _ in part], [r for _, _, r in part]],
                          {"ref_chosen": [x for x, _ in rf], "ref_rejected": [y for _, y in rf]},
                          {"responses": PAIRED.responses})
               for part, rf in ((rows[:2], refs[:2]), (rows[2:], refs[2:]))]

    loss64 = 0
    rewards = []
    for (p, c, r), (rc, rr) in zip(rows, refs):
        dc, dr = f64_logp(m64, p, c) - rc, f64_logp(m64, p, r) - rr
        z = beta * (dc - dr)
        loss64 = loss64 - (1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z)
        rewards.append((beta * float(dc.detach()), beta * float(dr.detach())))
    loss64 = loss64 / 4
    loss64.backward()
    grads64 = {n: p.grad.detach().clone() for n, p in m64.named_parameters()}
    gnorm64 = math.sqrt(sum(float(g.pow(2).sum()) for g in grads64.values()))

    lm, policy, opt, sched = trainer(tiny_model)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    out = train_step(policy, opt, sched, batches, LossConfig("dpo", beta, label_smoothing=eps), Procs())

    assert out["loss"] == pytest.approx(float(loss64.detach()), abs=1e-5)
    assert abs(float(loss64.detach()) - math.log(2)) > 0.1
    assert out["grad_norm"] == pytest.approx(gnorm64, rel=1e-4)
    assert out["lr"] == pytest.approx(LR * LR_FACTOR, rel=1e-12)
    assert out["r_chosen"] == pytest.approx(sum(a for a, _ in rewards) / 4, abs=1e-5)
    assert out["r_rejected"] == pytest.approx(sum(b for _, b in rewards) / 4, abs=1e-5)
    assert out["acc"] == sum(a > b for a, b in rewards) / 4
    assert out["examples"] == 4 and out["tokens"] == sum(len(p) * 2 + len(c) + len(r) for p, c, r in rows)
    assert_first_adamw_step(before, lm, grads64, LR * LR_FACTOR)
    assert all(p.grad is None for p in lm.parameters())  # gradients are cleared for the next step


def test_train_step_kto_reference_point_spans_both_micro_batches(tiny_model):
    """z0 is the mean over the whole global batch: the two micro-batches alone would give 0 and 1.2."""
    from prefpipe.data.cache import UNPAIRED
    from prefpipe.dist import Procs
    from prefpipe.modeling import load_model
    from prefpipe.train.config import LossConfig
    from prefpipe.train.step import train_step

    beta, lam_d, lam_u = 0.4, 1.3, 0.8
    rows = random_rows(4, seed=2)  # (prompt, own completion, partner completion)
    labels = [True, False, False, True]
    m64 = load_model(str(tiny_model), dtype=torch.float64)
    kl_offsets = [-0.5, -0.3, 1.0, 1.4]  # pi - ref of each mismatched completion: means -0.4, 1.2; overall 0.4
    own_offsets = [0.7, -0.2, 0.9, -1.1]
    with torch.no_grad():
        ref_kl = [float(f64_logp(m64, p, k)) - o for (p, _, k), o in zip(rows, kl_offsets)]
    ref_own = []
    h = []
    for (p, c, _), o in zip(rows, own_offsets):
        pi = f64_logp(m64, p, c)
        ref_own.append(float(pi.detach()) - o)
        h.append(pi - ref_own[-1])
    z0 = max(0.0, sum(float(f64_logp(m64, p, k).detach()) - r for (p, _, k), r in zip(rows, ref_kl)) / 4)
    assert z0 == pytest.approx(0.4, abs=1e-9)
    sig = torch.sigmoid
    loss64 = sum(lam_d * (1 - sig(beta * (x - z0))) if d else lam_u * (1 - sig(beta * (z0 - x)))
                 for x, d in zip(h, labels)) / 4
    loss64.backward()
    grads64 = {n: p.grad.detach().clone() for n, p in m64.named_parameters()}

    batches = []
    for sl in (slice(0, 2), slice(2, 4)):
        part = rows[sl]
        kl = hand_batch([p for p, _, _ in part], [[k for _, _, k in part]], {})
        b = hand_batch([p for p, _, _ in part], [[c for _, c, _ in part]],
                       {"ref_logp": ref_own[sl], "ref_kl": ref_kl[sl]},
                       {"label": torch.tensor(labels[sl]), "kl_ids": kl.ids, "kl_mask": kl.mask,
                        "kl_prompt_lens": kl.prompt_lens, "responses": UNPAIRED.responses[:1]})
        batches.append(b)
    lm, policy, opt, sched = trainer(tiny_model)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    out = train_step(policy, opt, sched, batches,
                     LossConfig("kto", beta, desirable_weight=lam_d, undesirable_weight=lam_u), Procs())
    assert out["kl"] == pytest.approx(z0, abs=1e-5)
    assert out["loss"] == pytest.approx(float(loss64.detach()), abs=1e-6)
    des = [beta * float(x.detach()) for x, d in zip(h, labels) if d]
    assert out["r_chosen"] == pytest.approx(sum(des) / 2, abs=1e-5)
    assert out["acc"] == sum((float(x.detach()) > z0) == d for x, d in zip(h, labels)) / 4
    assert_first_adamw_step(before, lm, grads64, LR * LR_FACTOR)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_yields_the_documented_order_from_any_start(tmp_path, tiny_model, workers):
    """The DataLoader's micro-batches are exactly make_batch of `micro_batches(order.global_rows(step))`, for
    process 1 of 2, starting mid-run (as a resumed run does), with or without a worker process."""
    import pyarrow as pa
    from prefpipe.train.batches import RowsDataset, make_batch, train_loader
    from prefpipe.train.order import Order, StepSampler, micro_batches
    from prefpipe.train.train_data import TrainData
    from prefpipe.train.registry import PAIRS
    rows = random_rows(30, seed=3)
    table = pa.table({"row_id": [str(i) for i in range(30)], "prompt_ids": [p for p, _, _ in rows],
                      "chosen_ids": [c for _, c, _ in rows], "rejected_ids": [r for _, _, r in rows],
                      "ref_chosen": [float(-i) for i in range(30)], "ref_rejected": [float(-2 * i) for i in range(30)]})
    data = TrainData("paired", table, True, "hand-made")
    order = Order(tuple(range(2, 30)), global_batch=2 * 3 * 2, seed=9)  # batch 2, accumulation 3, 2 processes
    ds = RowsDataset(data, PAIRS, pad_id=0, use_cached_reference=True)
    got = list(train_loader(ds, StepSampler(order, 3, 6, 2, 3, 2, 1), workers))
    want = [make_batch(data, mb, PAIRS, 0, "cpu", True)
            for step in range(3, 6) for mb in micro_batches(order.global_rows(step), 2, 3, 2, 1)]
    assert len(got) == len(want) == 9
    assert got[0].n == 2 and got[0].ids.shape[0] == 4
    for a, b in zip(got, want):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
        assert torch.equal(a.prompt_lens, b.prompt_lens) and a.tokens == b.tokens
        assert a.ref.keys() == b.ref.keys() and all(torch.equal(a.ref[k], b.ref[k]) for k in a.ref)
