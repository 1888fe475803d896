"""The losses against closed forms and per-element float64 recomputation with `math` (never the code's output)."""

import math
import random
from decimal import Decimal, getcontext

import pytest
import torch

from prefpipe.train.losses import (dpo_loss, hinge_loss, ipo_loss, kto_loss, kto_reference_point, log1mexp,
                                   orpo_loss, sft_loss)

LN2 = 0.6931471805599453


def t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def random_logps(n, seed):
    rng = random.Random(seed)
    return [[-rng.uniform(1, 60) for _ in range(n)] for _ in range(4)]


# ------------------------------------------------------------------ step-0 identities

def test_dpo_step0_is_ln2_and_acc_zero():
    pc, pr = t(-12.5, -3.0, -80.25), t(-7.0, -44.0, -1.5)
    out = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert out.losses.tolist() == pytest.approx([LN2] * 3, abs=1e-7)
    m = out.mean_metrics()
    assert m["acc"] == 0.0 and m["margin"] == 0.0 and m["r_chosen"] == 0.0


def test_kto_step0_is_half_and_z0_zero():
    pi = t(-10.0, -20.0, -5.0, -7.5)
    z0 = kto_reference_point(pi, pi.clone())
    assert float(z0) == 0.0
    out = kto_loss(pi, pi.clone(), torch.tensor([True, False, True, False]), z0)
    assert out.losses.tolist() == [0.5] * 4
    assert out.mean_metrics()["acc"] == 0.0


def test_hinge_step0_is_one():
    pc = t(-3.0, -9.0)
    assert hinge_loss(pc, pc, pc, pc).losses.tolist() == [1.0, 1.0]


# ------------------------------------------------------------------ hand-derived values

def test_dpo_hand_value():
    # c = 2, r = -1, delta = 3, beta*delta = 0.3: -log sigmoid(0.3) = log(1 + e^-0.3)
    out = dpo_loss(t(-10.0), t(-15.0), t(-12.0), t(-14.0), beta=0.1)
    assert float(out.loss) == pytest.approx(math.log1p(math.exp(-0.3)), abs=1e-6)
    m = out.mean_metrics()
    assert m["r_chosen"] == pytest.approx(0.2, abs=1e-6)
    assert m["r_rejected"] == pytest.approx(-0.1, abs=1e-6)
    assert m["margin"] == pytest.approx(0.3, abs=1e-6)
    assert m["acc"] == 1.0


def test_conservative_dpo_hand_value_and_gradient():
    eps, beta = 0.2, 0.5
    pc = t(-10.0).requires_grad_()
    out = dpo_loss(pc, t(-15.0), t(-12.0), t(-14.0), beta=beta, label_smoothing=eps)
    x = beta * 3.0
    want = -(1 - eps) * math.log(sig(x)) - eps * math.log(sig(-x))
    assert float(out.loss.detach()) == pytest.approx(want, abs=1e-6)
    out.loss.backward()
    # d/dpi_c of the loss = beta * (-(1-eps) * sigmoid(-x) + eps * sigmoid(x))
    assert float(pc.grad) == pytest.approx(beta * (-(1 - eps) * sig(-x) + eps * sig(x)), abs=1e-6)


def test_dpo_random_against_float64():
    pc, pr, rc, rr = random_logps(64, seed=1)
    for beta, eps in ((0.1, 0.0), (0.5, 0.1), (2.0, 0.3)):
        out = dpo_loss(t(*pc), t(*pr), t(*rc), t(*rr), beta=beta, label_smoothing=eps)
        want = []
        for a, b, c, d in zip(pc, pr, rc, rr):
            x = beta * ((a - c) - (b - d))
            want.append(-(1 - eps) * math.log(sig(x)) - eps * math.log(sig(-x)))
        assert out.losses.double().tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)
        acc = sum(beta * (a - c) > beta * (b - d) for a, b, c, d in zip(pc, pr, rc, rr)) / 64
        assert out.mean_metrics()["acc"] == pytest.approx(acc)


def test_ipo_uses_per_token_means():
    # c_avg = (-10 + 12) / 4 = 0.5, r_avg = (-15 + 14) / 2 = -0.5, 1/(2 beta) = 5: (1 - 5)^2 = 16
    out = ipo_loss(t(-10.0), t(-15.0), t(-12.0), t(-14.0), t(4.0), t(2.0), beta=0.1)
    assert float(out.loss) == pytest.approx(16.0, abs=1e-5)
    m = out.mean_metrics()
    assert m["r_chosen"] == pytest.approx(0.05, abs=1e-7) and m["r_rejected"] == pytest.approx(-0.05, abs=1e-7)
    # at step 0 the loss is (1 / (2 beta))^2
    pc = t(-3.0, -9.0)
    assert ipo_loss(pc, pc, pc, pc, t(3.0, 5.0), t(1.0, 2.0), beta=0.25).losses.tolist() == [4.0, 4.0]


def test_hinge_hand_values():
    # beta * delta = 0.3 -> 0.7; beta * delta = 1.5 -> 0
    out = hinge_loss(t(-10.0, -10.0), t(-15.0, -25.0), t(-12.0, -12.0), t(-14.0, -14.0), beta=0.1)
    assert out.losses.tolist() == pytest.approx([0.7, 0.0], abs=1e-6)


def test_kto_hand_value_with_weights_and_z0():
    pi_kl, ref_kl = t(-10.0, -11.0, -9.0), t(-10.5, -12.0, -9.0)  # differences 0.5, 1, 0 -> z0 = 0.5
    z0 = kto_reference_point(pi_kl, ref_kl)
    assert float(z0) == pytest.approx(0.5, abs=1e-7)
    pi, ref = t(-8.0, -20.0, -6.0), t(-10.0, -19.0, -6.0)  # h = 2, -1, 0
    des = torch.tensor([True, False, False])
    beta, wd, wu = 0.5, 2.0, 1.5
    out = kto_loss(pi, ref, des, z0, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    want = [wd * (1 - sig(beta * (2 - 0.5))), wu * (1 - sig(beta * (0.5 + 1))), wu * (1 - sig(beta * 0.5))]
    assert out.losses.tolist() == pytest.approx(want, abs=1e-6)
    m = out.mean_metrics()
    assert m["r_chosen"] == pytest.approx(beta * 2)  # only the desirable example
    assert m["r_rejected"] == pytest.approx(beta * (-1 + 0) / 2)
    assert m["margin"] == pytest.approx(1.0 + 0.25)
    assert m["acc"] == pytest.approx(1.0)  # 2 > 0.5, -1 < 0.5, 0 < 0.5


def test_kto_z0_is_clamped_at_zero_and_single_kind_batches_work():
    assert float(kto_reference_point(t(-12.0, -13.0), t(-10.0, -10.0))) == 0.0
    out = kto_loss(t(-1.0, -2.0), t(-1.0, -2.5), torch.tensor([False, False]), torch.tensor(0.0))
    m = out.mean_metrics()
    assert m["r_chosen"] is None and "margin" not in m and m["r_rejected"] == pytest.approx(0.025)


# ------------------------------------------------------------------ ORPO

def orpo_ref(pc, pr, lc, lr, lam):
    ac, ar = pc / lc, pr / lr
    lo = (ac - ar) - (math.log(-math.expm1(ac)) - math.log(-math.expm1(ar)))
    return -ac - lam * math.log(sig(lo)), lo


def test_orpo_random_against_float64():
    rng = random.Random(3)
    rows = [(-rng.uniform(0.5, 80), -rng.uniform(0.5, 80), rng.randint(1, 40), rng.randint(1, 40)) for _ in range(50)]
    cols = list(zip(*rows))
    out = orpo_loss(t(*cols[0]), t(*cols[1]), t(*cols[2]), t(*cols[3]), orpo_lambda=0.7)
    want = [orpo_ref(*r, 0.7) for r in rows]
    assert out.losses.double().tolist() == pytest.approx([w for w, _ in want], rel=1e-4, abs=1e-5)
    assert out.metrics["log_odds"].double().tolist() == pytest.approx([lo for _, lo in want], rel=1e-4, abs=1e-5)


def test_orpo_stable_near_zero_log_probs():
    # mean log-probs -1e-6 and -1e-8: a naive log(1 - exp(a)) in float32 is 1% off at -1e-6 and -inf at -1e-8
    pc = torch.tensor([-1e-6 * 5, -1e-8 * 3], requires_grad=True)
    pr = torch.tensor([-2.0, -0.5], requires_grad=True)
    lc, lr = t(5.0, 3.0), t(4.0, 2.0)
    out = orpo_loss(pc, pr, lc, lr, orpo_lambda=1.0)
    want = [orpo_ref(-5e-6, -2.0, 5, 4, 1.0), orpo_ref(-3e-8, -0.5, 3, 2, 1.0)]
    assert out.metrics["log_odds"].double().tolist() == pytest.approx([w[1] for w in want], rel=1e-5)
    assert out.losses.double().tolist() == pytest.approx([w[0] for w in want], rel=1e-4, abs=1e-7)
    out.loss.backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # probability exactly 1: capped, still finite in value and gradient
    pc0 = torch.tensor([0.0], requires_grad=True)
    out0 = orpo_loss(pc0, t(-1.0), t(3.0), t(3.0))
    out0.loss.backward()
    assert torch.isfinite(out0.loss) and torch.isfinite(pc0.grad).all()


def test_log1mexp_matches_float64_over_the_range():
    xs = [-1e-10, -1e-7, -1e-4, -0.1, -0.5, -0.7, -1.0, -5.0, -30.0, -100.0]
    got = log1mexp(torch.tensor(xs, dtype=torch.float32)).double().tolist()
    getcontext().prec = 50  # exact enough that neither float64 branch's cancellation leaks into the reference
    want = [float((1 - Decimal(x).exp()).ln()) for x in xs]
    assert got == pytest.approx(want, rel=2e-6, abs=1e-30)


def test_orpo_with_zero_lambda_is_sft_and_sft_is_token_mean_nll():
    pc, pr, lc, lr = t(-12.0, -30.0), t(-9.0, -5.0), t(4.0, 10.0), t(3.0, 2.0)
    sft = sft_loss(pc, lc)
    assert sft.losses.tolist() == pytest.approx([3.0, 3.0])
    assert orpo_loss(pc, pr, lc, lr, orpo_lambda=0.0).losses.tolist() == pytest.approx(sft.losses.tolist())
    assert sft.mean_metrics() == {"nll": pytest.approx(3.0)}


# ------------------------------------------------------------------ the registry

def test_every_registry_entry_matches_its_function_and_the_loss_config():
    """Each entry's inputs and parameters are exactly its function's arguments (in order), every parameter is a
    LossConfig field, and the metric names it declares are the ones its LossOutput carries."""
    import dataclasses
    import inspect

    from prefpipe.train.config import LossConfig
    from prefpipe.train.loss_names import BATCH_SHAPES, EXAMPLES, PAIRS
    from prefpipe.train.losses import LOSSES, get_loss

    fields = {f.name for f in dataclasses.fields(LossConfig)}
    offered = {PAIRS: {"pi_c", "pi_r", "ref_c", "ref_r", "len_c", "len_r"}, EXAMPLES: {"pi", "ref", "len", "desirable"}}
    for name, spec in LOSSES.items():
        loss = get_loss(name)
        args = list(inspect.signature(loss.fn).parameters)
        assert args == list(spec.inputs) + list(spec.params), name
        assert set(spec.params) <= fields - {"loss_type"}, name
        assert spec.batch in BATCH_SHAPES
        assert set(spec.inputs) - {"z0"} <= offered.get(spec.batch, {"pi_c", "len_c"}), name
        assert ("z0" in spec.inputs) == (spec.prestep == "kto_z0"), name
        n = 3
        inputs = {"pi_c": t(-5.0, -9.0, -2.0), "pi_r": t(-6.0, -3.0, -4.0), "ref_c": t(-5.5, -8.0, -2.5),
                  "ref_r": t(-6.5, -2.0, -4.0), "len_c": t(3.0, 5.0, 2.0), "len_r": t(4.0, 2.0, 3.0),
                  "pi": t(-5.0, -9.0, -2.0), "ref": t(-5.5, -8.0, -2.5), "len": t(3.0, 5.0, 2.0),
                  "desirable": torch.tensor([True, False, True]), "z0": torch.tensor(0.2)}
        out = loss(inputs, LossConfig(name))
        assert sorted(out.metrics) == sorted(spec.metrics), name
        assert out.losses.shape == (n,)


def test_registry_flags_by_hand_and_loss_names_imports_no_torch():
    import subprocess
    import sys

    from prefpipe.train import losses
    from prefpipe.train.loss_names import CHOSEN, EXAMPLES, PAIRS, spec
    assert losses.LOSS_TYPES == ("dpo", "ipo", "hinge", "kto", "orpo", "sft")
    assert losses.REFERENCE_FREE == ("orpo", "sft") == losses.WITHOUT_BETA
    assert losses.PAIRED_LOSSES == ("dpo", "ipo", "hinge", "orpo", "sft")
    assert [spec(n).batch for n in losses.LOSS_TYPES] == [PAIRS, PAIRS, PAIRS, EXAMPLES, PAIRS, CHOSEN]
    assert [n for n in losses.LOSS_TYPES if spec(n).prestep] == ["kto"]
    code = "import sys, prefpipe.train.loss_names; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
