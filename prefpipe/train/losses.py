"""Preference losses as pure functions of sequence log-probs (DPO, IPO, SLiC hinge, KTO, ORPO, SFT).

Every function takes summed response log-probs (and token counts where a per-token mean is needed) and returns a
`LossOutput`: the per-example losses (the batch loss is their mean) and per-example metric values. Keeping them
per example lets the training loop average exactly over a global batch that is split into micro-batches and
processes. A metric that does not apply to an example (KTO's `r_chosen` on an undesirable example) is NaN there
and is left out of that metric's mean. `margin` is derived after averaging, as mean(r_chosen) - mean(r_rejected);
for the paired losses that equals the mean of the per-pair margins.

Notation: `pi_c, pi_r` policy log-probs of chosen and rejected, `ref_c, ref_r` the reference's, `c = pi_c - ref_c`,
`r = pi_r - ref_r`, `delta = c - r`.

Which losses exist, and what each is called with, is the registry in `prefpipe.train.loss_names` (torch-free, so
`prefpipe --help` can list the choices); `get_loss(name)` pairs an entry with its function here.

Adding a loss: (1) write its pure function here, from per-example tensors to a `LossOutput`, with a docstring
giving the shapes, the formula and the paper; (2) add one `LossSpec` to `SPECS` in `loss_names.py` naming the
function, its tensor inputs, the `LossConfig` fields it reads (a new knob also needs a `LossConfig` field and its
CLI option), the batch shape, its metric names and, if it needs one, a pre-step; (3) add a test in
tests/test_losses.py against a hand-derived or float64 value. The CLI choice, the reference check, the run name
(with or without beta), batch building, the loop and the report all follow from the entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefpipe.train.loss_names import (LOSS_TYPES, LOSSES, PAIRED_LOSSES, REFERENCE_FREE,  # noqa: F401
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


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """DPO with the sigmoid loss (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7).

    Shapes: all inputs `[B]` summed response log-probs. Loss per pair:

        -(1 - eps) * log sigmoid(beta * delta) - eps * log sigmoid(-beta * delta)

    With `label_smoothing` eps > 0 this is the *conservative* DPO variant (cDPO, Mitchell 2023): the preference
    label is assumed flipped with probability eps. It is not the "robust" DPO of Chowdhury et al. 2024, which
    divides by (1 - 2 eps) and flips the sign of the second term. With eps = 0 and policy == reference the loss is
    exactly ln 2.

    Metrics: `r_chosen = beta * c`, `r_rejected = beta * r`, `acc = [beta*c > beta*r]` (strict, so 0 at step 0).
    """
    delta = (pi_c - ref_c) - (pi_r - ref_r)
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


def kto_reference_point(pi_kl, ref_kl) -> torch.Tensor:
    """KTO's z0 for one batch: `max(0, mean(pi(y'|x) - ref(y'|x)))` over mismatched pairs, without gradient.

    Shapes: `[B]` summed log-probs of each prompt with its pinned mismatched completion y'. The training loop
    does not call this on a micro-batch: it sums `pi_kl - ref_kl` over the whole global batch on all processes
    and applies the same formula, so z0 does not depend on how the batch is split.
    """
    return torch.clamp((pi_kl - ref_kl).detach().double().mean(), min=0.0).to(pi_kl.dtype)


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


@dataclass(frozen=True)
class Loss:
    """A registry entry with its function resolved: `loss(inputs, cfg)` calls the function with the entry's
    tensor inputs (by name, from `inputs`) and its parameters (read from `cfg`, a `LossConfig`)."""
    spec: LossSpec
    fn: object

    def __call__(self, inputs: dict, cfg) -> LossOutput:
        return self.fn(*(inputs[k] for k in self.spec.inputs), **{p: getattr(cfg, p) for p in self.spec.params})


def get_loss(name: str) -> Loss:
    spec = LOSSES[name]
    return Loss(spec, globals()[spec.fn])
