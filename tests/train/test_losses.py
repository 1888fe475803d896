"""The losses against closed forms and per-element float64 recomputation with `math` (never the code's output)."""

import math
import re
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
    z0 = torch.tensor(kto_reference_point(float((pi - pi.clone()).sum()), pi.numel()))
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
    z0 = torch.tensor(kto_reference_point(float((pi_kl - ref_kl).sum()), 3))
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
    assert kto_reference_point(-5.0, 2) == 0.0  # differences -2 and -3: a negative mean is clamped
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
    from prefpipe.train.registry import BATCH_SHAPES, EXAMPLES, PAIRS
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


def test_registry_flags_by_hand_and_the_registry_imports_no_torch():
    import subprocess
    import sys

    from prefpipe.train import losses
    from prefpipe.train.registry import CHOSEN, EXAMPLES, PAIRS, spec
    base = ("dpo", "ipo", "hinge", "kto", "orpo", "sft")
    family = ("robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
              "apo_down", "discopop", "sigmoid_norm", "dpop", "apo_zero_unpaired", "simpo", "cpo")
    assert losses.LOSS_TYPES[:6] == base and losses.LOSS_TYPES[-len(family):] == family
    assert set(losses.REFERENCE_FREE) >= {"orpo", "sft", "simpo", "cpo"}
    assert not {"orpo", "sft", "simpo", "cpo"} & set(spec(n).name for n in losses.LOSS_TYPES
                                                     if spec(n).needs_reference)
    assert set(losses.WITHOUT_BETA) >= {"orpo", "sft"} and not {"simpo", "cpo"} & set(losses.WITHOUT_BETA)
    assert [spec(n).batch for n in base] == [PAIRS, PAIRS, PAIRS, EXAMPLES, PAIRS, CHOSEN]
    assert [n for n in losses.LOSS_TYPES if spec(n).batch == EXAMPLES][-1] == "apo_zero_unpaired"
    assert [n for n in losses.LOSS_TYPES if spec(n).prestep] == ["kto"]
    code = "import sys, prefpipe.train.registry; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ the DPO family (REFERENCE section 10)
#
# Each `trl_*` below re-derives TRL 1.16's formula from REFERENCE section 10 in plain Python floats, row by row
# (batch-coupled ones over the whole list), without prefpipe code. ROWS is a 3-row batch whose c, r, delta have
# both signs; aot's sorted margins differ from the unsorted ones.

ROWS = {"pi_c": [-10.0, -25.5, -7.25], "pi_r": [-12.0, -20.0, -9.5], "ref_c": [-11.5, -24.0, -7.0],
        "ref_r": [-10.0, -21.5, -12.0], "len_c": [4.0, 9.0, 3.0], "len_r": [5.0, 6.0, 2.0]}
# c = [1.5, -1.5, -0.25], r = [-2, 1.5, 2.5], delta = [3.5, -3, -2.75]


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def rows():
    """(pi_c, pi_r, ref_c, ref_r, len_c, len_r, c, r, delta, delta_tok) per row."""
    out = []
    for pc, pr, rc, rr, nc, nr in zip(*(ROWS[k] for k in ("pi_c", "pi_r", "ref_c", "ref_r", "len_c", "len_r"))):
        c, r = pc - rc, pr - rr
        out.append((pc, pr, rc, rr, nc, nr, c, r, c - r, c / nc - r / nr))
    return out


def trl_sigmoid(b, **_):
    return [-logsig(b * d) for *_, d, _ in rows()]


def trl_hinge(b, **_):
    return [max(0.0, 1 - b * d) for *_, d, _ in rows()]


def trl_ipo(b, **_):
    return [(dt - 1 / (2 * b)) ** 2 for *_, dt in rows()]


def trl_sigmoid_norm(b, **_):
    return [-logsig(b * dt) for *_, dt in rows()]


def trl_robust(b, eps, **_):
    return [(-(1 - eps) * logsig(b * d) + eps * logsig(-b * d)) / (1 - 2 * eps) for *_, d, _ in rows()]


def trl_exo_pair(b, eps, **_):
    return [sig(b * d) * (logsig(b * d) - math.log(1 - eps)) + sig(-b * d) * (logsig(-b * d) - math.log(eps))
            for *_, d, _ in rows()]


def trl_nca_pair(b, **_):
    return [-logsig(b * c) - 0.5 * logsig(-b * c) - 0.5 * logsig(-b * r) for *_, c, r, _, _ in rows()]


def trl_bco_pair(b, **_):
    return [-logsig(b * c) - logsig(-b * r) for *_, c, r, _, _ in rows()]


def trl_sppo_hard(b, **_):
    return [(c - 1 / (2 * b)) ** 2 + (r + 1 / (2 * b)) ** 2 for *_, c, r, _, _ in rows()]


def _aot_tail(b, eps, deltas):
    return [-(1 - eps) * logsig(b * d) - eps * logsig(-b * d) for d in deltas]


def trl_aot(b, eps, **_):
    pol = sorted(x[0] - x[1] for x in rows())
    ref = sorted(x[2] - x[3] for x in rows())
    return _aot_tail(b, eps, [p - q for p, q in zip(pol, ref)])


def trl_aot_unpaired(b, eps, **_):
    return _aot_tail(b, eps, [p - q for p, q in zip(sorted(x[6] for x in rows()), sorted(x[7] for x in rows()))])


def trl_apo_zero(b, **_):
    return [(1 - sig(b * c)) + sig(b * r) for *_, c, r, _, _ in rows()]


def trl_apo_down(b, **_):
    return [sig(b * c) + 1 - sig(b * (c - r)) for *_, c, r, _, _ in rows()]


def trl_discopop(b, tau, **_):
    out = []
    for *_, d, _ in rows():
        z = b * d
        m = sig(z / tau)
        out.append(-logsig(z) * (1 - m) + math.exp(-z) * m)
    return out


TRL = {"dpo": trl_sigmoid, "hinge": trl_hinge, "ipo": trl_ipo, "sigmoid_norm": trl_sigmoid_norm,
       "robust": trl_robust, "exo_pair": trl_exo_pair, "nca_pair": trl_nca_pair, "bco_pair": trl_bco_pair,
       "sppo_hard": trl_sppo_hard, "aot": trl_aot, "aot_unpaired": trl_aot_unpaired, "apo_zero": trl_apo_zero,
       "apo_down": trl_apo_down, "discopop": trl_discopop}


def f64_inputs(grad=False):
    out = {k: torch.tensor(v, dtype=torch.float64) for k, v in ROWS.items()}
    if grad:
        out["pi_c"].requires_grad_()
        out["pi_r"].requires_grad_()
    return out


def run_loss(name, inputs, **cfg):
    from prefpipe.train.config import LossConfig
    from prefpipe.train.losses import get_loss
    return get_loss(name)(inputs, LossConfig(name, **cfg))


@pytest.mark.parametrize("name", sorted(TRL))
@pytest.mark.parametrize("beta, eps", [(0.5, 0.1), (0.1, 0.3)])
def test_trl_named_losses_match_an_independent_rederivation(name, beta, eps):
    kw = {"label_smoothing": eps} if name in ("robust", "exo_pair", "aot", "aot_unpaired") else {}
    want = TRL[name](beta, eps=eps, tau=0.05)
    out = run_loss(name, f64_inputs(), beta=beta, **kw)
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    if name not in ("ipo", "sigmoid_norm"):  # those two log per-token rewards (see docs/losses.md)
        m = out.mean_metrics()
        assert m["r_chosen"] == pytest.approx(beta * (1.5 - 1.5 - 0.25) / 3, abs=1e-12)
        assert m["r_rejected"] == pytest.approx(beta * (-2 + 1.5 + 2.5) / 3, abs=1e-12)
        assert m["acc"] == pytest.approx(1 / 3)  # only row 0 has c > r


def test_hand_values_on_row_zero():
    """Row 0 (c = 1.5, r = -2, delta = 3.5) worked out by hand, beta = 0.5."""
    one = {k: v[:1] for k, v in f64_inputs().items()}
    # sppo_hard: (1.5 - 1)^2 + (-2 + 1)^2
    assert run_loss("sppo_hard", one, beta=0.5).losses.tolist() == pytest.approx([1.25], abs=1e-12)
    # apo_zero: 1 - sigmoid(0.75) + sigmoid(-1); apo_down: sigmoid(0.75) + 1 - sigmoid(1.75)
    assert run_loss("apo_zero", one, beta=0.5).losses.tolist() == pytest.approx([1 - sig(0.75) + sig(-1.0)])
    assert run_loss("apo_down", one, beta=0.5).losses.tolist() == pytest.approx([sig(0.75) + 1 - sig(1.75)])
    # bco_pair: log(1 + e^-0.75) + log(1 + e^-1); nca_pair: log(1+e^-0.75) + (log(1+e^0.75) + log(1+e^-1)) / 2
    assert run_loss("bco_pair", one, beta=0.5).losses.tolist() == pytest.approx(
        [math.log1p(math.exp(-0.75)) + math.log1p(math.exp(-1.0))])
    assert run_loss("nca_pair", one, beta=0.5).losses.tolist() == pytest.approx(
        [math.log1p(math.exp(-0.75)) + 0.5 * (math.log1p(math.exp(0.75)) + math.log1p(math.exp(-1.0)))])
    # robust, eps = 0.25: (0.75 log(1 + e^-1.75) - 0.25 log(1 + e^1.75)) / 0.5
    assert run_loss("robust", one, beta=0.5, label_smoothing=0.25).losses.tolist() == pytest.approx(
        [(0.75 * math.log1p(math.exp(-1.75)) - 0.25 * math.log1p(math.exp(1.75))) / 0.5])
    # sigmoid_norm: delta_tok = 1.5/4 + 2/5 = 0.775
    assert run_loss("sigmoid_norm", one, beta=0.5).losses.tolist() == pytest.approx(
        [math.log1p(math.exp(-0.5 * 0.775))])
    # dpop, lambda = 2: ref_c - pi_c = -1.5 < 0, no penalty: plain DPO; row 1 (ref_c - pi_c = 1.5):
    # z = 0.5 * (-3 - 2 * 1.5) = -3
    assert run_loss("dpop", one, beta=0.5, dpop_lambda=2.0).losses.tolist() == pytest.approx(
        [math.log1p(math.exp(-1.75))])
    two = {k: v[1:2] for k, v in f64_inputs().items()}
    assert run_loss("dpop", two, beta=0.5, dpop_lambda=2.0).losses.tolist() == pytest.approx(
        [math.log1p(math.exp(3.0))])


def test_exo_pair_zero_label_smoothing_means_the_papers_1e_3():
    eps = 1e-3
    want = [sig(0.5 * d) * (logsig(0.5 * d) - math.log(1 - eps)) + sig(-0.5 * d) * (logsig(-0.5 * d) - math.log(eps))
            for d in (3.5, -3.0, -2.75)]
    assert run_loss("exo_pair", f64_inputs(), beta=0.5).losses.tolist() == pytest.approx(want, rel=1e-12)


STEP0 = {  # policy == reference, beta = 0.1, eps = 0.1 where read, defaults otherwise
    "dpo": LN2, "ipo": 25.0, "hinge": 1.0, "sigmoid_norm": LN2, "robust": LN2, "nca_pair": 2 * LN2,
    "exo_pair": -LN2 - 0.5 * (math.log(0.1) + math.log(0.9)), "bco_pair": 2 * LN2, "sppo_hard": 2 * 5.0 ** 2,
    "aot": LN2, "aot_unpaired": LN2, "apo_zero": 1.0, "apo_down": 1.0, "discopop": (LN2 + 1) / 2, "dpop": LN2}


@pytest.mark.parametrize("name", sorted(STEP0))
def test_step0_identity(name):
    x = f64_inputs()
    x["ref_c"], x["ref_r"] = x["pi_c"].clone(), x["pi_r"].clone()
    kw = {"label_smoothing": 0.1} if name in ("robust", "exo_pair", "aot", "aot_unpaired") else {}
    out = run_loss(name, x, beta=0.1, **kw)
    assert out.losses.tolist() == pytest.approx([STEP0[name]] * 3, abs=1e-12)
    assert out.mean_metrics()["acc"] == 0.0


def test_step0_identity_of_the_unpaired_apo_and_reference_free_values():
    pi = torch.tensor([-4.0, -9.0, -2.5], dtype=torch.float64)
    out = run_loss("apo_zero_unpaired", {"pi": pi, "ref": pi.clone(), "desirable": torch.tensor([True, False, True])})
    assert out.losses.tolist() == [0.5, 0.5, 0.5]
    # simpo/cpo at equal chosen and rejected log-probs: softplus(gamma); ln 2 + alpha * token-mean NLL
    same = {"pi_c": pi, "pi_r": pi.clone(), "len_c": torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64)}
    same["len_r"] = same["len_c"].clone()
    assert run_loss("simpo", same, simpo_gamma=0.5).losses.tolist() == pytest.approx([math.log1p(math.exp(0.5))] * 3)
    assert run_loss("cpo", same, cpo_alpha=0.5).losses.tolist() == pytest.approx(
        [LN2 + 0.5 * 2.0, LN2 + 0.5 * 3.0, LN2 + 0.5 * 0.5])


def test_apo_zero_unpaired_simpo_cpo_dpop_hand_values():
    pi, ref = torch.tensor([-8.0, -20.0, -6.0], dtype=torch.float64), torch.tensor([-10.0, -19.0, -6.0],
                                                                                  dtype=torch.float64)
    des = torch.tensor([True, False, False])  # h = 2, -1, 0
    out = run_loss("apo_zero_unpaired", {"pi": pi, "ref": ref, "desirable": des}, beta=0.5, desirable_weight=2.0,
                   undesirable_weight=1.5)
    assert out.losses.tolist() == pytest.approx([2 * (1 - sig(1.0)), 1.5 * sig(-0.5), 1.5 * 0.5], rel=1e-12)
    m = out.mean_metrics()
    assert m["r_chosen"] == pytest.approx(1.0) and m["r_rejected"] == pytest.approx(-0.25) and m["acc"] == 2 / 3
    x = f64_inputs()
    # simpo: beta (pi_c/len_c - pi_r/len_r) - gamma = 2 * (-2.5 + 2.4) - 0.3 = -0.5 on row 0
    s = run_loss("simpo", x, beta=2.0, simpo_gamma=0.3)
    want = [-logsig(2.0 * (pc / nc - pr / nr) - 0.3) for pc, pr, _, _, nc, nr, *_ in rows()]
    assert s.losses.tolist() == pytest.approx(want, rel=1e-12) and want[0] == pytest.approx(math.log1p(math.exp(0.5)))
    # cpo: -log sigmoid(0.5 * (pi_c - pi_r)) + 0.7 * (-pi_c / len_c); row 0: log(1 + e^-1) + 0.7 * 2.5
    c = run_loss("cpo", x, beta=0.5, cpo_alpha=0.7)
    assert c.losses.tolist()[0] == pytest.approx(math.log1p(math.exp(-1.0)) + 1.75, rel=1e-12)
    assert c.mean_metrics()["nll"] == pytest.approx((2.5 + 25.5 / 9 + 7.25 / 3) / 3)
    d = run_loss("dpop", x, beta=0.5)  # lambda = 50 by default
    assert d.losses.tolist() == pytest.approx(
        [-logsig(0.5 * (dl - 50 * max(0.0, rc - pc))) for pc, _, rc, _, _, _, _, _, dl, _ in rows()], rel=1e-12)


def test_f_divergences_replace_the_log_ratios_inside_delta():
    def psi(kind, u, a=None):
        return {"forward_kl": 1 - math.exp(-u), "js": LN2 + logsig(u),
                "alpha": None if a is None else (math.exp((a - 1) * u) - 1) / (a - 1)}[kind]
    for kind, alpha in (("forward_kl", 1.0), ("js", 1.0), ("alpha", 0.5), ("alpha", 2.0)):
        a = alpha if kind == "alpha" else None
        want = [-logsig(0.5 * (psi(kind, c, a) - psi(kind, r, a))) for *_, c, r, _, _ in rows()]
        out = run_loss("dpo", f64_inputs(), beta=0.5, f_divergence=kind, f_alpha=alpha)
        assert out.losses.tolist() == pytest.approx(want, rel=1e-12), kind
        assert out.mean_metrics()["r_chosen"] == pytest.approx(0.5 * (1.5 - 1.5 - 0.25) / 3)
    # alpha = 1 is reverse KL (plain DPO); alpha = 0 is forward KL
    assert run_loss("dpo", f64_inputs(), beta=0.5, f_divergence="alpha").losses.tolist() == pytest.approx(
        trl_sigmoid(0.5), rel=1e-12)
    assert run_loss("dpo", f64_inputs(), beta=0.5, f_divergence="alpha", f_alpha=0.0).losses.tolist() == \
        pytest.approx(run_loss("dpo", f64_inputs(), beta=0.5, f_divergence="forward_kl").losses.tolist(), rel=1e-12)


def _train_cfg(losses, **knobs):
    from prefpipe.train.config import LossConfig, SourceConfig, TrainConfig
    return TrainConfig(SourceConfig(model="m", data="d"), "out", tuple(losses), loss=LossConfig(**knobs))


def test_a_knob_that_no_loss_of_the_call_reads_is_refused():
    """One rule for every knob (it used to hold for --f_divergence only: `--loss_type ipo --simpo_gamma 2` trained
    ipo and ignored the knob)."""
    from prefpipe.errors import UserError
    from prefpipe.train.config import LossConfig
    for losses, knob, value in ((("ipo",), "simpo_gamma", 2.0), (("ipo",), "f_divergence", "js"),
                                (("dpo",), "desirable_weight", 2.0), (("orpo", "sft"), "label_smoothing", 0.1),
                                (("0.5*dpo+1*sft",), "cpo_alpha", 0.5), (("hinge",), "ld_alpha", 0.5)):
        with pytest.raises(UserError, match=f"--{knob} is read by no loss of this call"):
            _train_cfg(losses, **{knob: value})
    # read by one loss of the call: accepted, and the losses that do not read it run as without it
    cfg = _train_cfg(("dpo", "ipo"), label_smoothing=0.1, f_divergence="js")
    assert [r.run_name for r in cfg.runs()] == ["dpo-beta0.1", "ipo-beta0.1"]
    _train_cfg(("0.5*dpo+1*sft",), f_divergence="js")  # a combination with dpo in it reads it
    _train_cfg(("kto",), desirable_weight=1.33)
    with pytest.raises(UserError, match="--f_alpha needs --f_divergence alpha"):
        LossConfig("dpo", f_alpha=0.5)


def test_unread_knob_on_the_command_line_is_one_line_before_anything_loads(run_cli, tmp_path):
    from helpers import one_line_error
    r = run_cli("train", "--model", tmp_path / "no-model", "--data", tmp_path / "no.jsonl", "--out", tmp_path / "o",
                "--loss_type", "ipo", "--simpo_gamma", "2")
    one_line_error(r, "--simpo_gamma is read by no loss of this call (ipo)")


def test_knob_ranges_come_from_the_registry():
    from prefpipe.errors import UserError
    from prefpipe.train.config import LossConfig
    from prefpipe.train.registry import KNOBS
    for name, bad in (("label_smoothing", 0.5), ("discopop_tau", 0.0), ("dpop_lambda", -1.0), ("cpo_alpha", -1.0),
                      ("desirable_weight", 0.0), ("undesirable_weight", -2.0), ("orpo_lambda", -0.1),
                      ("ld_alpha", 1.5), ("simpo_gamma", float("nan"))):
        assert not KNOBS[name].valid(bad)
        with pytest.raises(UserError, match=f"--{name} must be {re.escape(KNOBS[name].rule)}"):
            LossConfig(**{name: bad})


def test_every_entry_says_what_its_accuracy_and_margin_mean():
    """The report reads these from the entry; an entry that logs `acc` must name it, one that does not must not."""
    from prefpipe.train.registry import LOSSES, VARIANTS
    for spec in list(LOSSES.values()) + list(VARIANTS.values()):
        logs_acc = "acc" in spec.metrics
        assert bool(spec.acc_kind) == logs_acc and bool(spec.acc_label) == logs_acc, spec.name
    assert LOSSES["robust"].acc_kind == LOSSES["dpo"].acc_kind  # same meaning: one ranking basis
    assert LOSSES["ipo"].acc_kind != LOSSES["dpo"].acc_kind
    assert LOSSES["0.5*ipo+1*sft"].acc_kind == LOSSES["ipo"].acc_kind


# Which way each loss moves each log-prob at step 0: -1 means the loss falls when that log-prob rises.
GRAD_SIGNS = {"dpo": (-1, 1), "robust": (-1, 1), "exo_pair": (-1, 1), "nca_pair": (-1, 1), "bco_pair": (-1, 1),
              "sppo_hard": (-1, 1), "aot": (-1, 1), "aot_unpaired": (-1, 1), "apo_zero": (-1, 1),
              "apo_down": (0, 1), "sigmoid_norm": (-1, 1), "dpop": (-1, 1), "simpo": (-1, 1), "cpo": (-1, 1),
              "hinge": (-1, 1), "ipo": (-1, 1)}


@pytest.mark.parametrize("name", sorted(GRAD_SIGNS))
def test_gradient_signs_at_step0(name):
    x = f64_inputs(grad=True)
    x["ref_c"], x["ref_r"] = x["pi_c"].detach().clone(), x["pi_r"].detach().clone()
    kw = {"label_smoothing": 0.1} if name in ("robust", "exo_pair", "aot", "aot_unpaired") else {}
    run_loss(name, x, beta=0.1, **kw).loss.backward()
    for t_, sign in zip((x["pi_c"].grad, x["pi_r"].grad), GRAD_SIGNS[name]):
        if sign == 0:
            assert t_.abs().max() < 1e-15, name
        else:
            assert bool((torch.sign(t_) == sign).all()), (name, t_)


def test_discopop_pushes_delta_down_at_step0_by_its_hand_derivative():
    # f(z) = -log sigmoid(z) (1 - m) + e^-z m, m = sigmoid(z/tau): f'(0) = -3/4 + (1 - ln 2) / (4 tau)
    x = f64_inputs(grad=True)
    x["ref_c"], x["ref_r"] = x["pi_c"].detach().clone(), x["pi_r"].detach().clone()
    run_loss("discopop", x, beta=0.1).loss.backward()
    slope = -0.75 + (1 - LN2) / (4 * 0.05)
    assert x["pi_c"].grad.tolist() == pytest.approx([0.1 * slope / 3] * 3, rel=1e-10)
    assert x["pi_r"].grad.tolist() == pytest.approx([-0.1 * slope / 3] * 3, rel=1e-10)
    # stays finite where exp(-z) alone overflows (z = -1000)
    far = {k: v.detach().clone() for k, v in f64_inputs().items()}
    far["pi_c"] = far["pi_c"] - 10000.0
    assert torch.isfinite(run_loss("discopop", far, beta=0.1).losses).all()


# ------------------------------------------------------------------ combinations

def test_combination_is_the_weighted_sum_of_its_parts():
    b = 0.5
    out = run_loss("0.8*sigmoid+0.2*bco_pair+1.0*sft", f64_inputs(), beta=b)
    want = [0.8 * -logsig(b * d) + 0.2 * (-logsig(b * c) - logsig(-b * r)) + 1.0 * (-pc / nc)
            for pc, _, _, _, nc, _, c, r, d, _ in rows()]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)
    m = out.mean_metrics()
    assert m["loss_dpo"] == pytest.approx(sum(-logsig(b * d) for *_, d, _ in rows()) / 3, rel=1e-12)
    assert m["loss_sft"] == pytest.approx((10 / 4 + 25.5 / 9 + 7.25 / 3) / 3, rel=1e-12) == m["nll"]
    assert m["r_chosen"] == pytest.approx(b * (1.5 - 1.5 - 0.25) / 3) and m["acc"] == pytest.approx(1 / 3)


def test_combination_names_specs_and_errors():
    from prefpipe.errors import UserError
    from prefpipe.train.config import LossConfig
    from prefpipe.train.registry import CHOSEN, LOSSES, PAIRS
    cfg = LossConfig(" 0.8*sigmoid + 0.2*bco_pair + 1.0*sft")
    assert cfg.loss_type == "0.8*dpo+0.2*bco_pair+1*sft"
    assert cfg.run_name == "0.8dpo+0.2bco_pair+1sft-beta0.1"
    s = LOSSES[cfg.loss_type]
    assert s.batch == PAIRS and s.needs_reference and s.uses_beta
    assert s.parts == ((0.8, "dpo"), (0.2, "bco_pair"), (1.0, "sft"))
    assert LossConfig("sigmoid").run_name == "dpo-beta0.1" and LossConfig("1*orpo").loss_type == "orpo"
    free = LossConfig("0.5*orpo+sft")
    assert free.run_name == "0.5orpo+1sft" and not free.needs_reference
    assert LOSSES["2*sft"].batch == CHOSEN and LOSSES["0.123456789*simpo+cpo"].name == "0.123456789*simpo+1*cpo"
    for bad, why in (("xyz", "unknown loss 'xyz'"), ("kto+dpo", "kto trains on single examples"),
                     ("dpo+sigmoid", "dpo appears twice"), ("-1*dpo", "positive"), ("a*dpo", "not a number")):
        with pytest.raises(UserError, match=why):
            LossConfig(bad)
    with pytest.raises(KeyError):
        LOSSES["dpo+xyz"]


def test_train_config_canonicalises_and_sweeps_combinations():
    from prefpipe.train.config import SourceConfig, TrainConfig
    tc = TrainConfig(source=SourceConfig(model="m", cache="c"), out="o", betas=(0.1, 0.2),
                     loss_types=("sigmoid", "dpo", "0.8*sigmoid+0.2*sft", "0.5*orpo+sft"))
    assert [r.run_name for r in tc.runs()] == ["dpo-beta0.1", "dpo-beta0.2", "0.8dpo+0.2sft-beta0.1",
                                              "0.8dpo+0.2sft-beta0.2", "0.5orpo+1sft"]


# ------------------------------------------------------------------ aot's batch is the micro-batch

def test_aot_with_grad_accum_is_the_mean_of_micro_batch_losses(tiny_model):
    """Two micro-batches of 2 pairs: each is sorted on its own (by hand here), the step's loss is the mean of the
    two micro-batch means, and the gradient is that of this loss (float64 autograd on the tiny model)."""
    from test_train_step import f64_logp, hand_batch, random_rows, trainer

    from prefpipe.data.cache import PAIRED
    from prefpipe.dist import Procs
    from prefpipe.modeling import load_model
    from prefpipe.train.config import LossConfig
    from prefpipe.train.step import train_step

    beta = 0.5
    data = random_rows(4, seed=5)
    m64 = load_model(str(tiny_model), dtype=torch.float64)
    with torch.no_grad():
        # row 2's reference margin is moved above every other (the policy's margins span about -35..18 here),
        # so sorting the whole batch would pair the margins differently than sorting each micro-batch
        offsets = [(6.0, 0.0), (4.0, -1.0), (60.0, 0.0), (-3.0, 1.0)]
        refs = [(float(f64_logp(m64, p, c)) + a, float(f64_logp(m64, p, r)) + b)
                for (p, c, r), (a, b) in zip(data, offsets)]
    parts = ((data[:2], refs[:2]), (data[2:], refs[2:]))
    batches = [hand_batch([p for p, _, _ in part], [[c for _, c, _ in part], [r for _, _, r in part]],
                          {"ref_chosen": [x for x, _ in rf], "ref_rejected": [y for _, y in rf]},
                          {"responses": PAIRED.responses}) for part, rf in parts]
    loss64 = 0
    for part, rf in parts:
        margins = [f64_logp(m64, p, c) - f64_logp(m64, p, r) for p, c, r in part]
        ref_margins = sorted(a - b for a, b in rf)
        for m, q in zip(sorted(margins, key=lambda v: float(v.detach())), ref_margins):
            loss64 = loss64 - torch.nn.functional.logsigmoid(beta * (m - q)) / 4
    whole = sorted([float((f64_logp(m64, p, c) - f64_logp(m64, p, r)).detach()) for p, c, r in data])
    whole_ref = sorted(a - b for a, b in refs)
    global_sort = sum(-logsig(beta * (m - q)) for m, q in zip(whole, whole_ref)) / 4
    loss64.backward()
    gnorm64 = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in m64.parameters()))

    lm, policy, opt, sched = trainer(tiny_model)
    out = train_step(policy, opt, sched, batches, LossConfig("aot", beta), Procs())
    assert out["loss"] == pytest.approx(float(loss64.detach()), abs=1e-5)
    assert abs(global_sort - float(loss64.detach())) > 1e-2  # sorting the global batch would differ
    assert out["grad_norm"] == pytest.approx(gnorm64, rel=1e-4)
