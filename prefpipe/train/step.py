"""One optimizer step, with no I/O: what a test can call directly on a tiny model and a hand-made batch."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from prefpipe.train.losses import get_loss
from prefpipe.train.batch_loss import MetricSums, batch_loss, run_prestep


def train_step(policy, optimizer, scheduler, batches: list, loss_cfg, procs, *, ref_scorer=None,
               autocast=None, max_grad_norm: float = 0.0) -> dict:
    """One optimizer step of `policy` (a `parallel.Policy`) over this process's micro-batches `batches` of one
    global batch, for the loss entry of `loss_cfg` (a `LossConfig`: its type and parameters).

    The entry's pre-step (KTO's z0) runs first over every micro-batch on all processes. The loss is the mean over
    every row of the global batch (all processes' micro-batches, which are assumed full and of equal size), so
    the gradient does not depend on how the rows are split. Gradients are clipped to `max_grad_norm` (0: no
    clipping). Returns the step's exact global means (`loss`, the entry's metrics, `margin`), `examples`,
    `tokens`, `grad_norm` (before clipping), `lr` (the rate this step used), and what the pre-step logs (`kl`).
    """
    loss = get_loss(loss_cfg.spec)
    autocast = autocast if autocast is not None else nullcontext()
    device = batches[0].ids.device
    extra, logged = run_prestep(loss, [(b, True) for b in batches], policy.scorer, ref_scorer, autocast, procs,
                                device)
    n_global = procs.world * sum(b.n for b in batches)
    sums = MetricSums()
    for k, b in enumerate(batches):
        with policy.sync(last_micro_batch=k == len(batches) - 1):
            out = batch_loss(b, policy.train_module, ref_scorer, loss_cfg, autocast, extra)
            # per-example losses over the global batch; DDP/FSDP average gradients over processes
            (out.losses.sum() * (procs.world / n_global)).backward()
        sums.add(out, b.tokens)
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(list(policy.parameters()), max_norm)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    m = sums.reduce(procs, device, list(loss.spec.metrics))
    return {**m, "grad_norm": grad_norm, "lr": lr, **logged}
