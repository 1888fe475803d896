"""Preference losses as pure functions of sequence log-probs (DPO, IPO, SLiC hinge, KTO, ORPO, SFT).

Every function takes summed response log-probs (and token counts where a per-token mean is needed) and returns a
`LossOutput`: the per-example losses (the batch loss is their mean) and per-example metric values. Keeping them
per example lets the training loop average exactly over a global batch that is split into micro-batches and
processes. A metric that does not apply to an example (KTO's `r_chosen` on an undesirable example) is NaN there
and is left out of that metric's mean. `margin` is derived after averaging, as mean(r_chosen) - mean(r_rejected);
for the paired losses that equals the mean of the per-pair margins.

Notation: `pi_c, pi_r` policy log-probs of chosen and rejected, `ref_c, ref_r` the reference's, `c = pi_c - ref_c`,
`r = pi_r - ref_r`, `delta = c - r`.

Which losses exist, and what each is called with, is the registry in `prefpipe.train.registry` (torch-free, so
`prefpipe --help` can list the choices); `get_loss(entry)` pairs an entry with its function here.

Adding a loss: (1) write its pure function here, from per-example tensors to a `LossOutput`, with a docstring
giving the shapes, the formula and the paper; (2) add one `LossSpec` to `SPECS` in `registry.py` naming the
function, its tensor inputs, its parameters (`beta` and its knobs: a new knob is one `Knob` declared beside the
entry and listed in `KNOBS`, which gives it its `LossConfig` field, flag, pipeline key and range check), the
batch shape, its metric names, what its `acc` and margin mean, and, if it needs one, a pre-step; (3) add a test
in tests/train/test_losses.py against a hand-derived or float64 value. The CLI choice, the reference check, the run
name (with or without beta), batch building, the loop and the report all follow from the entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefpipe.train.registry import (LOSS_TYPES, LOSSES, PAIRED_LOSSES, REFERENCE_FREE,  # noqa: F401
                                       WITHOUT_BETA, LossSpec)


@dataclass
class LossOutput:
    losses: torch.Tensor  # [B]; the batch loss is losses.mean()
    metrics: dict  # name -> [B] float tensor (detached); NaN where the metric does not apply

    @property
    def loss(self) -> torch.Tensor:
        return self.losses.mean()

    def mean_metrics(self) -> dict:
        """Batch means, ignoring NaN, with `margin` derived; a metric with no valid example is None."""
        out = {}
        for k, v in self.metrics.items():
            ok = ~torch.isnan(v)
            out[k] = float(v[ok].double().mean()) if bool(ok.any()) else None
        if out.get("r_chosen") is not None and out.get("r_rejected") is not None:
            out["margin"] = out["r_chosen"] - out["r_rejected"]
        return out


def _reward_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict:
    r_chosen, r_rejected = r_chosen.detach(), r_rejected.detach()
    return {"r_chosen": r_chosen, "r_rejected": r_rejected, "acc": (r_chosen > r_rejected).float()}


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, label_smoothing: float = 0.0,
             f_divergence: str = "reverse_kl", f_alpha: float = 1.0) -> LossOutput:
    """DPO with the sigmoid loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7).

    Shapes: all inputs `[B]` summed response log-probs. Loss per pair:

        -(1 - eps) * log sigmoid(beta * delta) - eps * log sigmoid(-beta * delta)

    With `label_smoothing` eps > 0 this is the *conservative* DPO variant (cDPO, Mitchell 2023): the preference
    label is assumed flipped with probability eps. It is not the "robust" DPO of Chowdhury et al. 2024, which
    divides by (1 - 2 eps) and flips the sign of the second term. With eps = 0 and policy == reference the loss is
    exactly ln 2.

    TRL 1.16's `sigmoid` ignores eps; prefpipe keeps cDPO here and offers Chowdhury's formula as `robust`.

    `f_divergence` (f-DPO, Wang et al. 2023) replaces c and r inside delta by `f_divergence_score` of each; the
    default reverse KL is plain DPO. Only this loss honours it (TRL also applies it to its other paired losses).

    Metrics: `r_chosen = beta * c`, `r_rejected = beta * r`, `acc = [beta*c > beta*r]` (strict, so 0 at step 0),
    whatever the f-divergence.
    """
    if f_divergence == "reverse_kl":
        delta = (pi_c - ref_c) - (pi_r - ref_r)
    else:
        delta = (f_divergence_score(pi_c - ref_c, f_divergence, f_alpha)
                 - f_divergence_score(pi_r - ref_r, f_divergence, f_alpha))
    logits = beta * delta
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return LossOutput(losses, _reward_metrics(beta * (pi_c - ref_c), beta * (pi_r - ref_r)))


def ipo_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta: float = 0.1) -> LossOutput:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17), on per-token mean log-probs.

    Shapes: log-prob sums `[B]` and response token counts `len_c, len_r` `[B]`. With `c_avg = (pi_c - ref_c) /
    len_c` and `r_avg = (pi_r - ref_r) / len_r`:

        (c_avg - r_avg - 1 / (2 * beta)) ** 2

    Metrics use the same per-token means the loss sees: `r_chosen = beta * c_avg`, `r_rejected = beta * r_avg`.
    """
    c_avg = (pi_c - ref_c) / len_c
    r_avg = (pi_r - ref_r) / len_r
    losses = (c_avg - r_avg - 1.0 / (2.0 * beta)) ** 2
    return LossOutput(losses, _reward_metrics(beta * c_avg, beta * r_avg))


def hinge_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1) -> LossOutput:
    """Hinge loss of SLiC (Zhao et al. 2023, "SLiC-HF"), with the reference-normalised margin of DPO.

    Shapes: all `[B]` summed log-probs. Loss per pair: `relu(1 - beta * delta)` (so 1 at step 0). Metrics as
    `dpo_loss`.
    """
    delta = (pi_c - ref_c) - (pi_r - ref_r)
    losses = torch.relu(1.0 - beta * delta)
    return LossOutput(losses, _reward_metrics(beta * (pi_c - ref_c), beta * (pi_r - ref_r)))


def kto_reference_point(kl_sum: float, n: float) -> float:
    """KTO's z0: `max(0, mean(pi(y'|x) - ref(y'|x)))` over the mismatched pairs of a whole global batch, given
    the sum of `pi(y'|x) - ref(y'|x)` (summed log-probs of each prompt with its pinned mismatched completion y',
    without gradient) and the number of pairs. The training loop sums over every micro-batch on all processes
    first (`batch_loss.kto_z0`), so z0 does not depend on how the batch is split."""
    return max(0.0, kl_sum / n)


def kto_loss(pi, ref, desirable, z0, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8).

    Shapes: `pi, ref` `[B]` summed log-probs of each example's own completion, `desirable` `[B]` bool, `z0` a
    scalar (from `kto_reference_point`, detached). With `h = pi - ref`, the loss per example is

        desirable:    lambda_D * (1 - sigmoid(beta * (h - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - h)))

    and the batch loss is the plain mean over examples. Policy == reference gives z0 = 0 and a loss of 0.5
    (with unit weights).

    Metrics: `r_chosen` is `beta * h` on desirable examples (NaN elsewhere) and `r_rejected` on undesirable ones,
    so their means are the mean implicit rewards of each kind in the batch. `acc` is the fraction of examples on
    the right side of the reference point (`h > z0` for desirable, `h < z0` for undesirable; 0 at step 0).
    """
    desirable = desirable.bool()
    z0 = z0.detach()
    h = pi - ref
    d_loss = desirable_weight * (1.0 - torch.sigmoid(beta * (h - z0)))
    u_loss = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - h)))
    losses = torch.where(desirable, d_loss, u_loss)
    reward = (beta * h).detach()
    nan = torch.full_like(reward, math.nan)
    hd = h.detach()
    metrics = {"r_chosen": torch.where(desirable, reward, nan), "r_rejected": torch.where(desirable, nan, reward),
               "acc": torch.where(desirable, hd > z0, hd < z0).float()}
    return LossOutput(losses, metrics)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(x))` for x < 0, accurate at both ends (Maechler 2012: expm1 near 0, log1p far from it)."""
    near = x > -math.log(2.0)
    # Each branch gets a harmless input where it is not selected: torch.where still differentiates both, and an
    # infinite gradient in the unused branch would turn into NaN.
    x_near = torch.where(near, x, torch.full_like(x, -1.0))
    x_far = torch.where(near, torch.full_like(x, -1.0), x)
    return torch.where(near, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


# A response whose every token has probability 1 has a mean log-prob of exactly 0 and infinite odds; capping the
# mean just below 0 keeps the log-odds finite (about 27.6) and the gradient defined.
_MAX_MEAN_LOGP = -1e-12


def orpo_loss(pi_c, pi_r, len_c, len_r, orpo_lambda: float = 1.0) -> LossOutput:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eq. 2-7).

    Shapes: summed log-probs `pi_c, pi_r` `[B]` and response token counts `len_c, len_r` `[B]`. With the
    per-token means `a_c = pi_c / len_c`, `a_r = pi_r / len_r`:

        log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))
        loss     = -a_c - lambda * log sigmoid(log_odds)

    The NLL term is the paper's: the token mean over the *chosen response* of each pair (prompt tokens are not
    counted), then averaged over pairs. `log(1 - exp(a))` is computed with a stable `log1mexp`, and `a` is capped
    at -1e-12 so a response of probability 1 still gives finite values.

    Metrics: `nll = -a_c`, `log_odds`, `r_chosen = a_c`, `r_rejected = a_r` (per-token mean log-probs), and
    `acc = [a_c > a_r]`, which is the same as `log_odds > 0`.
    """
    a_c = torch.clamp(pi_c / len_c, max=_MAX_MEAN_LOGP)
    a_r = torch.clamp(pi_r / len_r, max=_MAX_MEAN_LOGP)
    log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    nll = -a_c
    losses = nll - orpo_lambda * F.logsigmoid(log_odds)
    metrics = _reward_metrics(a_c, a_r)
    metrics.update(nll=nll.detach(), log_odds=log_odds.detach())
    return LossOutput(losses, metrics)


def sft_loss(pi_c, len_c) -> LossOutput:
    """Plain supervised fine-tuning on the chosen responses: `-pi_c / len_c` per example.

    Shapes: `[B]` summed log-probs and token counts of the chosen responses. The NLL is the token mean over each
    chosen response, then averaged over examples: exactly ORPO's NLL term, so `sft` is ORPO with lambda = 0 and
    serves as the "continued SFT on the chosen answers" baseline. Metrics: `nll` only.
    """
    nll = -pi_c / len_c
    return LossOutput(nll, {"nll": nll.detach()})


# ------------------------------------------------------------------ the rest of the DPO family (TRL's names)
#
# All take `[B]` summed log-probs (and `[B]` token counts where named `len_*`) and return per-pair losses; the
# batch loss is their mean. Unless a docstring says otherwise the metrics are `r_chosen = beta * c`,
# `r_rejected = beta * r`, `acc = [beta*c > beta*r]`, as TRL logs them.

# exp() of a larger argument overflows float32 (max ~ e^88.7); f-divergence scores cap their exponent here.
_MAX_EXP = 80.0


def f_divergence_score(u, f_divergence: str = "reverse_kl", f_alpha: float = 1.0):
    """psi(u) for a log-ratio `u = log(pi / ref)` `[B]`: the f-DPO replacement of `u` inside delta (Wang et al.
    2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
    Thm. 1; psi is f' of the ratio, with constants that cancel in `psi(c) - psi(r)` kept for readability):

        reverse_kl  u                                  (plain DPO)
        forward_kl  1 - exp(-u)
        js          log 2 + log sigmoid(u)
        alpha       (exp((alpha - 1) u) - 1) / (alpha - 1);  alpha = 1 is the reverse-KL limit u, alpha = 0
                    is forward KL

    Exponent arguments are capped at 80 so that float32 stays finite (the gradient is then 0 for that response).
    """
    if f_divergence == "reverse_kl" or (f_divergence == "alpha" and f_alpha == 1.0):
        return u
    if f_divergence == "forward_kl":
        return -torch.expm1(torch.clamp(-u, max=_MAX_EXP))
    if f_divergence == "js":
        return math.log(2.0) + F.logsigmoid(u)
    if f_divergence == "alpha":
        k = f_alpha - 1.0
        return torch.expm1(torch.clamp(k * u, max=_MAX_EXP)) / k
    raise ValueError(f"unknown f_divergence {f_divergence!r}")


def _log_ratios(pi_c, pi_r, ref_c, ref_r):
    return pi_c - ref_c, pi_r - ref_r


def _rewards(beta, c, r) -> dict:
    return _reward_metrics(beta * c, beta * r)


def _smoothed(z, eps: float):
    """`-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`: the label-smoothed logistic loss of cDPO and AOT."""
    out = -(1.0 - eps) * F.logsigmoid(z)
    return out - eps * F.logsigmoid(-z) if eps else out


def robust_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    eq. 12): an unbiased estimate of the clean DPO loss when labels flip with probability eps < 1/2.

        [-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)] / (1 - 2 eps)

    eps = 0 is DPO. Unlike `dpo` with `--label_smoothing` (cDPO), the flipped term enters with a plus sign.
    """
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    z = beta * (c - r)
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return LossOutput(losses, _rewards(beta, c, r))


# The EXO paper's epsilon, used when --label_smoothing is 0 (log 0 would make the loss infinite).
EXO_DEFAULT_EPS = 1e-3


def exo_pair_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Pairwise EXO (Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", eq. 16):
    KL from the policy's preference distribution over {chosen, rejected} to the smoothed label (1 - eps, eps).

        sigmoid(z) (log sigmoid(z) - log(1 - eps)) + sigmoid(-z) (log sigmoid(-z) - log eps),  z = beta delta

    eps is `--label_smoothing`; 0 (the default) means the paper's eps = 1e-3. Step 0 (z = 0):
    `-log 2 - (log eps + log(1 - eps)) / 2`.
    """
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    z = beta * (c - r)
    eps = label_smoothing or EXO_DEFAULT_EPS
    losses = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
              + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
    return LossOutput(losses, _rewards(beta, c, r))


def nca_pair_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1) -> LossOutput:
    """Pairwise NCA (Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    eq. 11 for K = 2): `-log sigmoid(beta c) - 1/2 log sigmoid(-beta c) - 1/2 log sigmoid(-beta r)`. Each
    response is scored against the reference on its own, so the chosen log-prob is pushed up in absolute terms.
    Step 0: 2 ln 2."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    return LossOutput(losses, _rewards(beta, c, r))


def bco_pair_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1) -> LossOutput:
    """Pairwise BCO (Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment"):
    `-log sigmoid(beta c) - log sigmoid(-beta r)`, chosen classified as good and rejected as bad. Like TRL's DPO
    trainer, no reward shift delta (the paper's BCO trainer keeps a running mean of the rewards and subtracts it).
    Step 0: 2 ln 2."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    losses = -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    return LossOutput(losses, _rewards(beta, c, r))


def sppo_hard_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    eq. 4.7 with P(chosen wins) = 1): `(c - 1/(2 beta))^2 + (r + 1/(2 beta))^2`, regressing each log-ratio to a
    target of its own. Step 0: `2 (1/(2 beta))^2`."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    half = 0.5 / beta
    return LossOutput((c - half) ** 2 + (r + half) ** 2, _rewards(beta, c, r))


def aot_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT for paired data (Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal
    Transport"): the policy's margins `pi_c - pi_r` and the reference's `ref_c - ref_r` are each sorted over the
    batch, `d_k` is the difference of the k-th smallest of each, and the loss is the label-smoothed logistic loss
    `-(1 - eps) log sigmoid(beta d_k) - eps log sigmoid(-beta d_k)` (first-order stochastic dominance of the
    policy's margin distribution over the reference's).

    The batch is **the micro-batch** (`--batch_size` rows on one process), as in TRL: results depend on
    `--batch_size` but not on `--grad_accum` or the number of processes, whose micro-batches are sorted separately
    and averaged with equal weight. The k-th loss belongs to a rank, not to the k-th pair; the metrics are per
    pair. One row gives DPO."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    d = torch.sort(pi_c - pi_r).values - torch.sort(ref_c - ref_r).values
    return LossOutput(_smoothed(beta * d, label_smoothing), _rewards(beta, c, r))


def aot_unpaired_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT for unpaired data (Melnyk et al. 2024, as `aot_loss`): `d_k` is the k-th smallest chosen log-ratio
    `c` minus the k-th smallest rejected log-ratio `r` over the micro-batch (see `aot_loss` for why the
    micro-batch), then the same label-smoothed logistic loss. TRL calls this `aot_unpaired` (formerly
    `aot_pair`); it still trains on pairs, it just ignores which chosen goes with which rejected."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    d = torch.sort(c).values - torch.sort(r).values
    return LossOutput(_smoothed(beta * d, label_smoothing), _rewards(beta, c, r))


def apo_zero_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", eq. 7):
    `(1 - sigmoid(beta c)) + sigmoid(beta r)`: chosen up and rejected down, each anchored at the reference.
    For chosen answers better than the model's own. Step 0: 1."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    return LossOutput(1.0 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r), _rewards(beta, c, r))


def apo_down_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): `sigmoid(beta c) + 1 - sigmoid(beta (c - r))`: chosen down,
    rejected down more. For chosen answers worse than the model's own. Step 0: 1 (and no gradient on chosen)."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    return LossOutput(torch.sigmoid(beta * c) + 1.0 - torch.sigmoid(beta * (c - r)), _rewards(beta, c, r))


def discopop_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference Optimization
    Algorithms with and for Large Language Models", eq. 5). With `z = beta delta` and `m = sigmoid(z / tau)`:

        -log sigmoid(z) (1 - m) + exp(-z) m

    `exp(-z) m` is computed as `exp(-z + log sigmoid(z / tau))`, which stays finite where exp(-z) alone would
    overflow (and 0 * inf would give NaN). Step 0: (ln 2 + 1) / 2. The loss is not monotone: with tau = 0.05 its
    slope at z = 0 is positive, so the first steps push delta down."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    z = beta * (c - r)
    losses = -F.logsigmoid(z) * torch.sigmoid(-z / discopop_tau) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    return LossOutput(losses, _rewards(beta, c, r))


def sigmoid_norm_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta: float = 0.1) -> LossOutput:
    """DPO on per-token log-ratios (TRL's `sigmoid_norm`): `-log sigmoid(beta (c/len_c - r/len_r))`. Step 0:
    ln 2. Like `ipo`, the rewards are the per-token ones the loss sees (`beta c/len_c`, `beta r/len_r`); TRL
    logs the summed `beta c`, `beta r`."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    c_tok, r_tok = c / len_c, r / len_r
    return LossOutput(-F.logsigmoid(beta * (c_tok - r_tok)), _rewards(beta, c_tok, r_tok))


def dpop_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
    eq. 3): `-log sigmoid(beta (delta - lambda max(0, ref_c - pi_c)))`: DPO plus a penalty whenever the chosen
    response becomes less likely than under the reference. lambda defaults to 50, the value of the paper's
    experiments. Step 0: ln 2."""
    c, r = _log_ratios(pi_c, pi_r, ref_c, ref_r)
    z = beta * (c - r - dpop_lambda * torch.relu(ref_c - pi_c))
    return LossOutput(-F.logsigmoid(z), _rewards(beta, c, r))


def apo_zero_unpaired_loss(pi, ref, desirable, beta: float = 0.1, desirable_weight: float = 1.0,
                           undesirable_weight: float = 1.0) -> LossOutput:
    """APO-zero on unpaired examples (D'Oosterlinck et al. 2024, eq. 7 split by label; TRL's KTO trainer's
    `apo_zero_unpaired`). Shapes: `pi, ref` `[B]`, `desirable` `[B]` bool. With `h = pi - ref`:

        desirable:    lambda_D (1 - sigmoid(beta h))
        undesirable:  lambda_U sigmoid(beta h)

    No KL reference point, so no pre-step: KTO with z0 = 0 and APO's anchoring. Step 0: 0.5 with unit weights.
    Metrics as `kto_loss` with z0 = 0."""
    desirable = desirable.bool()
    h = pi - ref
    losses = torch.where(desirable, desirable_weight * (1.0 - torch.sigmoid(beta * h)),
                         undesirable_weight * torch.sigmoid(beta * h))
    reward = (beta * h).detach()
    nan = torch.full_like(reward, math.nan)
    metrics = {"r_chosen": torch.where(desirable, reward, nan), "r_rejected": torch.where(desirable, nan, reward),
               "acc": torch.where(desirable, reward > 0, reward < 0).float()}
    return LossOutput(losses, metrics)


def simpo_loss(pi_c, pi_r, len_c, len_r, beta: float = 0.1, simpo_gamma: float = 0.5) -> LossOutput:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", eq. 6),
    reference-free: `-log sigmoid(beta (pi_c/len_c - pi_r/len_r) - gamma)`.

    gamma is `--simpo_gamma` (default 0.5, TRL's CPO trainer's), the margin itself (not gamma/beta). The paper
    tunes beta in 2-10 and gamma/beta in 0.3-1; beta = 0.1 is TRL's default, not the paper's. Pure SimPO: TRL's
    CPO trainer adds `cpo_alpha * NLL` (default 1) to SimPO too, which here is the combination `simpo+sft`.
    Metrics: `r_chosen = beta pi_c/len_c`, `r_rejected = beta pi_r/len_r`."""
    a_c, a_r = pi_c / len_c, pi_r / len_r
    return LossOutput(-F.logsigmoid(beta * (a_c - a_r) - simpo_gamma), _rewards(beta, a_c, a_r))


def cpo_loss(pi_c, pi_r, len_c, beta: float = 0.1, cpo_alpha: float = 1.0) -> LossOutput:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in
    Machine Translation", eq. 3), reference-free: `-log sigmoid(beta (pi_c - pi_r)) + alpha nll` with
    `nll = -pi_c/len_c`, the chosen response's token-mean NLL as in `sft_loss`. alpha is `--cpo_alpha` (default
    1, TRL's). Metrics: `r_chosen = beta pi_c`, `r_rejected = beta pi_r` (TRL's CPO rewards), `nll`."""
    nll = -pi_c / len_c
    metrics = _rewards(beta, pi_c, pi_r)
    metrics["nll"] = nll.detach()
    return LossOutput(-F.logsigmoid(beta * (pi_c - pi_r)) + cpo_alpha * nll, metrics)


class Combination:
    """A weighted combination (`0.8*dpo+0.2*bco_pair+1*sft`, see `registry`): per-example loss
    `sum_k w_k loss_k`, so its mean is `sum_k w_k mean(loss_k)` as in TRL. Metrics: every term's, the first term
    that logs a name winning (so `0.8*dpo+1*ipo` logs dpo's summed rewards), plus `loss_<name>` per term, the
    term's unweighted loss."""

    def __init__(self, spec: LossSpec):
        self.spec = spec
        self.terms = tuple((w, name, get_loss(name)) for w, name in spec.parts)

    def __call__(self, inputs: dict, cfg) -> LossOutput:
        total, metrics = None, {}
        for w, name, loss in self.terms:
            out = loss(inputs, cfg)
            total = w * out.losses if total is None else total + w * out.losses
            for k, v in out.metrics.items():
                metrics.setdefault(k, v)
            metrics[f"loss_{name}"] = out.losses.detach()
        return LossOutput(total, metrics)


@dataclass(frozen=True)
class Loss:
    """A registry entry with its function resolved: `loss(inputs, cfg)` calls the function with the entry's
    tensor inputs (by name, from `inputs`) and its parameters (read from `cfg`, a `LossConfig`)."""
    spec: LossSpec
    fn: object

    def __call__(self, inputs: dict, cfg) -> LossOutput:
        return self.fn(*(inputs[k] for k in self.spec.inputs), **{p: getattr(cfg, p) for p in self.spec.params})


def get_loss(entry: LossSpec | str) -> Loss | Combination:
    """The callable of a registry entry (a run's `LossConfig.spec`), or of a name `LOSSES` accepts (a registered
    loss, an alias, a combination)."""
    spec = LOSSES[entry] if isinstance(entry, str) else entry
    return Combination(spec) if spec.parts else Loss(spec, globals()[spec.fn])


# ---------------------------------------------------------------- per-token variants: LD-DPO and WPO

def _tail(tokens: torch.Tensor, keep: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Sum of each row's per-token values at response positions `keep <= t < n` ([B, T] padded -> [B])."""
    pos = torch.arange(tokens.shape[-1], device=tokens.device)[None, :]
    beyond = (pos >= keep[:, None]) & (pos < n[:, None])
    return torch.where(beyond, tokens, torch.zeros_like(tokens)).sum(-1)


def ld_dpo_loss(pi_c, pi_r, ref_c, ref_r, len_c, len_r, pi_c_tok, pi_r_tok, ref_c_tok, ref_r_tok,
                beta: float = 0.1, label_smoothing: float = 0.0, ld_alpha: float = 1.0) -> LossOutput:
    """LD-DPO (Liu et al. 2024, "Length Desensitization in Directed Preference Optimization"): DPO on
    length-desensitised log-probs. With `m = min(n_c, n_r)` per pair, a response's log-prob is the sum over its
    first `m` tokens plus `alpha` times the sum over the rest, for policy and reference alike:

        ld(x) = sum_{t < m} x_t + alpha * sum_{m <= t < n} x_t = sum(x) - (1 - alpha) * tail(x)

    and the loss is `dpo_loss` on `ld(pi_c), ld(pi_r), ld(ref_c), ld(ref_r)`.

    Shapes: the sums `pi_*`, `ref_*` and counts `len_*` are `[B]`; the per-token values `*_tok` are `[B, T]`,
    zero-padded after each response's count. The full sums are the summed inputs (the policy's float32 sums and
    the cache's float64 reference sums) and only the tails come from the per-token values, so `alpha = 1` is
    exactly `dpo_loss`, and the shorter response of a pair (empty tail) is scored exactly as in DPO.
    Metrics (rewards) are `beta` times the length-desensitised log-ratios.
    """
    keep = torch.minimum(len_c, len_r)
    drop = 1.0 - ld_alpha

    def ld(total, tokens, n):
        return total - drop * _tail(tokens.to(total.dtype), keep, n)
    return dpo_loss(ld(pi_c, pi_c_tok, len_c), ld(pi_r, pi_r_tok, len_r), ld(ref_c, ref_c_tok, len_c),
                    ld(ref_r, ref_r_tok, len_r), beta=beta, label_smoothing=label_smoothing)


def wpo_weights(pi_tok, log_sum_sq, n) -> torch.Tensor:
    """WPO's per-response weight (Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference
    Optimization"), as TRL computes it: `exp(mean_t(log p_t - log sum_v p_v^2))` over the response's `n` scored
    tokens, from the policy and without gradient. Each term compares the token's probability with the
    distribution's collision probability `sum_v p_v^2` (the expected probability of a token the policy itself
    would sample), so responses the policy finds likely weigh more; a weight can exceed 1.

    Shapes: `pi_tok`, `log_sum_sq` `[B, T]` zero-padded per-token values; `n` `[B]` scored-token counts.
    """
    pos = torch.arange(pi_tok.shape[-1], device=pi_tok.device)[None, :]
    valid = pos < n[:, None]
    terms = torch.where(valid, pi_tok.detach().double() - log_sum_sq.double(), torch.zeros((), dtype=torch.float64,
                                                                                          device=pi_tok.device))
    return torch.exp(terms.sum(-1) / n.double().clamp(min=1)).to(pi_tok.dtype)


def wpo_weighted(out: LossOutput, w_c: torch.Tensor, w_r: torch.Tensor) -> LossOutput:
    """The pair losses of `out` multiplied by `w_c * w_r` (detached); metrics unchanged."""
    return LossOutput(out.losses * (w_c * w_r).detach().to(out.losses.dtype), out.metrics)
