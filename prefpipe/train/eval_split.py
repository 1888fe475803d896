"""Metrics over the whole eval split, at a given step."""

from __future__ import annotations

import torch

from prefpipe.train.batches import make_batch
from prefpipe.train.order import eval_batches
from prefpipe.train.losses import get_loss
from prefpipe.train.batch_loss import MetricSums, batch_loss, run_prestep


@torch.no_grad()
def evaluate(ctx, policy, ref_scorer, loss_cfg, use_cached_ref: bool, at_step: int) -> dict:
    """The eval record `{"split": "eval", "step", "loss", metrics..., "examples"}`: exact means over the eval rows
    of every process. A pre-step (KTO's z0) runs over the whole split."""
    procs, device = ctx.procs, ctx.device
    loss = get_loss(loss_cfg.spec)
    pad_id = ctx.tokenizer.pad_token_id
    parts = [(make_batch(ctx.data, rows, loss.spec.batch, pad_id, device, use_cached_ref,
                         pack=getattr(policy, "packed", False)), real)
             for rows, real in eval_batches(ctx.eval_rows, ctx.cfg.loop.batch_size, procs.world, procs.rank)]
    extra, logged = run_prestep(loss, parts, policy.scorer, ref_scorer, ctx.autocast(), procs, device)
    sums = MetricSums()
    for b, real in parts:
        out = batch_loss(b, policy.scorer, ref_scorer, loss_cfg, ctx.autocast(), extra)
        if real:
            sums.add(out, b.tokens)
    m = sums.reduce(procs, device, list(loss.spec.metrics))
    m.pop("tokens", None)
    return {"split": "eval", "step": at_step, **m, **logged}
