"""From a padded batch to a `LossOutput`: policy forward, reference (cached or live), and the loss."""

from __future__ import annotations

import torch

from prefpipe.data.cache import PAIRED, UNPAIRED
from prefpipe.train import losses as L
from prefpipe.train.registry import EXAMPLES, PAIRS


@torch.no_grad()
def _live(ref_scorer, inputs: tuple[tuple, dict], autocast, tokens: bool = False):
    """The live reference on a batch's `forward_inputs` (packed or padded, like the policy's): `(sums [B], None)`,
    or with `tokens` `(sums, per-token [B, n])` from that same forward."""
    args, kwargs = inputs
    with autocast:
        if not tokens:
            return ref_scorer(*args, **kwargs).sums, None
        out = ref_scorer(*args, **kwargs, extras=("tokens",))
        return out.sums, out.extras["tokens"].float()


def kl_terms(batch, policy_scorer, ref_scorer, autocast) -> torch.Tensor:
    """KTO: `pi(y'|x) - ref(y'|x)` per example for the pinned mismatched completions, without gradient."""
    args, kwargs = batch.forward_inputs(kl=True)
    with torch.no_grad(), autocast:
        pi_kl = policy_scorer(*args, **kwargs).sums
    ref_kl = batch.ref[UNPAIRED.response("kl").ref] if ref_scorer is None else _live(
        ref_scorer, (args, kwargs), autocast)[0]
    return pi_kl.float() - ref_kl


def kto_z0(parts, policy_scorer, ref_scorer, autocast, procs, device) -> tuple[dict, dict]:
    """KTO's reference point over every real example of `parts` ((batch, real) pairs) on all processes:
    `losses.kto_reference_point` of the global sum and count of pi(y'|x) - ref(y'|x).
    Batches marked not real still run their forwards (FSDP ranks run in lockstep) and are left out."""
    s, n = 0.0, 0
    for b, real in parts:
        kl = kl_terms(b, policy_scorer, ref_scorer, autocast)
        if real:
            s, n = s + float(kl.double().sum()), n + kl.numel()
    s, n = procs.sum([s, float(n)], device)
    z0 = torch.tensor(L.kto_reference_point(s, n), dtype=torch.float32, device=device)
    return {"z0": z0}, {"kl": float(z0)}  # the same on every process: it comes from global sums


# Pre-steps by the name a LossSpec gives: (parts, policy_scorer, ref_scorer, autocast, procs, device) ->
# (extra loss inputs, values to log with the step).
PRESTEPS = {"kto_z0": kto_z0}


def run_prestep(loss: L.Loss, parts, policy_scorer, ref_scorer, autocast, procs, device) -> tuple[dict, dict]:
    """The entry's pre-step over a whole global batch (or eval split), or nothing when it has none."""
    if loss.spec.prestep is None:
        return {}, {}
    return PRESTEPS[loss.spec.prestep](parts, policy_scorer, ref_scorer, autocast, procs, device)


def _inputs(shape: str, batch, sums, counts, ref) -> dict:
    """The named per-example tensors a loss function can ask for (see registry)."""
    if shape == EXAMPLES:
        return {"pi": sums, "len": counts, "ref": ref, "desirable": batch.label}
    n = batch.n
    out = {"pi_c": sums[:n], "len_c": counts[:n]}
    if shape == PAIRS:
        out.update(pi_r=sums[n:], len_r=counts[n:])
        if ref is not None:
            out.update(ref_c=ref[:n], ref_r=ref[n:])
    return out


def _policy_extras(loss: L.Loss, loss_cfg) -> tuple:
    """Per-token outputs the policy forward must add (see `sequence_logprobs`'s `extras`)."""
    want = set()
    if any(i.endswith("_tok") for i in loss.spec.inputs):
        want.add("tokens")
    if loss_cfg.wpo:
        want |= {"tokens", "log_sum_sq"}
    return tuple(sorted(want))


def _token_inputs(batch, tokens: torch.Tensor, ref_tok: torch.Tensor | None) -> dict:
    """Per-token log-probs of a paired batch, `[n, T]` zero-padded: the policy's (`tokens`, with gradient) and the
    reference's, from the live reference's forward (`ref_tok`) or else the cache's per-token columns."""
    n = batch.n
    if ref_tok is None:
        ref_c, ref_r = (batch.ref[r.tokens] for r in PAIRED.responses)
    else:
        ref_c, ref_r = ref_tok[:n], ref_tok[n:]
    return {"pi_c_tok": tokens[:n], "pi_r_tok": tokens[n:], "ref_c_tok": ref_c, "ref_r_tok": ref_r}


def batch_loss(batch, policy_module, ref_scorer, loss_cfg, autocast, extra: dict | None = None) -> L.LossOutput:
    """Run the policy on `batch` (every response in one forward, packed or padded) and apply the registry entry of
    `loss_cfg` (its `spec`: `ld_dpo` for dpo with --ld_alpha), with `extra` inputs from its pre-step. With
    `loss_cfg.wpo` each pair's loss is then multiplied by the policy's WPO weights `w_c * w_r`.

    `policy_module` is called with gradients enabled if they are; `ref_scorer` is None for the cached reference
    (or a reference-free loss)."""
    loss = L.get_loss(loss_cfg.spec)
    wanted = _policy_extras(loss, loss_cfg)
    args, kwargs = batch.forward_inputs()
    with autocast:
        out = policy_module(*args, **kwargs, **({"extras": wanted} if wanted else {}))
    sums, counts = out.sums.float(), out.counts.float()
    per_token = {k: v.float() for k, v in out.extras.items()} if wanted else {}
    ref, ref_tok, by_token = None, None, "pi_c_tok" in loss.spec.inputs
    if loss.spec.needs_reference and ref_scorer is None:
        ref = batch.cached_reference()
    elif loss.spec.needs_reference:  # one reference forward serves the sums and, for LD-DPO, the tokens
        ref, ref_tok = _live(ref_scorer, (args, kwargs), autocast, tokens=by_token)
        ref = ref.float()
    inputs = _inputs(loss.spec.batch, batch, sums, counts, ref)
    if by_token:
        inputs.update(_token_inputs(batch, per_token["tokens"], ref_tok))
    inputs.update(extra or {})
    result = loss(inputs, loss_cfg)
    if loss_cfg.wpo:
        w = L.wpo_weights(per_token["tokens"], per_token["log_sum_sq"], counts)
        result = L.wpo_weighted(result, w[:batch.n], w[batch.n:])
    return result


class MetricSums:
    """Per-example sums over a global batch, reduced over processes at the end: the logged means are exact
    means over every example of the step, however it was split. Sums stay on the device until `reduce`, so a GPU
    step synchronises once."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []  # one [2 + 2 * len(names)] float64 vector per micro-batch
        self.names: list[str] | None = None
        self.tokens = 0

    def add(self, out: L.LossOutput, tokens: int = 0):
        names = sorted(out.metrics)
        if self.names is None:
            self.names = names
        losses = out.losses.detach().double()
        vals = [losses.sum(), losses.new_tensor(float(losses.numel()))]
        for k in names:
            v = out.metrics[k].double()
            ok = ~torch.isnan(v)
            vals += [torch.where(ok, v, torch.zeros_like(v)).sum(), ok.sum().double()]
        self.parts.append(torch.stack(vals))
        self.tokens += tokens

    def reduce(self, procs, device, names: list[str]) -> dict:
        """Means over all processes. `names` must be the same list on every process."""
        local = {}
        if self.parts:
            total = torch.stack(self.parts).sum(0).tolist()
            local = {"loss": (total[0], total[1])}
            for i, k in enumerate(self.names):
                local[k] = (total[2 + 2 * i], total[3 + 2 * i])
        vec = [*local.get("loss", (0.0, 0.0)), float(self.tokens)]
        for k in names:
            vec += list(local.get(k, (0.0, 0.0)))
        vec = procs.sum(vec, device)
        out = {"loss": vec[0] / vec[1] if vec[1] else None, "examples": int(vec[1]), "tokens": int(vec[2])}
        for i, k in enumerate(names):
            s, c = vec[3 + 2 * i], vec[4 + 2 * i]
            out[k] = s / c if c else None
        if out.get("r_chosen") is not None and out.get("r_rejected") is not None:
            out["margin"] = out["r_chosen"] - out["r_rejected"]
        elif "r_chosen" in names:
            out["margin"] = None
        return out
