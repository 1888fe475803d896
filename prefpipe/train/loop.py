"""Phase two: `run_training(cfg) -> summary`, the loop behind `prefpipe train` (and the pipeline, in-process).

Output files, all under `cfg.out` (RUNS_DIR):

    summary.json              {"model", "cache", "data", "reference", "validation", "runs": [RUN, ...]}
    <loss>-beta<beta>/        one directory per run, `orpo/` and `sft/` for the losses without beta
                              (layout in prefpipe/train/checkpoint.py)

RUN (also written alone to `<run>/result.json`):

    {"name": "dpo-beta0.1", "dir": "dpo-beta0.1", "loss_type": "dpo", "beta": 0.1, "steps": 120,
     "final": {train metrics of the last step}, "eval": {the last evaluation} or null,
     "model_dir": "dpo-beta0.1/final", "metrics": "dpo-beta0.1/metrics.jsonl", "wall_s": 81.2,
     "peak_memory_gb": null or CUDA peak allocated}

`validation`: {"tokenizer": "match" | "not checked (--data)", "model": "match" | "mismatch (allowed)" |
"not checked", "drift": {"mean_abs_per_token", "worst_row_per_token", "rows", "tokens", "max_drift"} or null}.

metrics.jsonl: one object per line. Train steps: {"split": "train", "step" (1-based, after the optimizer step),
"epoch" (fractional), "loss", "acc", "r_chosen", "r_rejected", "margin", "grad_norm" (before clipping), "lr"
(used for this step), "tokens_per_s", "step_time_s", "examples", "tokens"}, plus "kl" (z0) for KTO and "nll",
"log_odds" for ORPO; sft logs "loss" and "nll" only. Evaluations: {"split": "eval", "step", the same metric keys}.
A metric with nothing to average (KTO `r_chosen` in a batch without desirable examples) is null.

Decisions a user may want to know:

- `--batch_size` is per process; one optimizer step sees `batch_size x grad_accum x processes` rows, and the
  loss is the mean over exactly those rows, however they are split.
- The learning rate warms up linearly over `ceil(warmup_ratio x steps)` steps, reaching `--lr` at the last
  warm-up step (the first step already moves), then decays to 0 at the end (linear, cosine) or stays (constant).
- Policy weights and AdamW state are float32. On GPU the forward runs under bf16 autocast (`--dtype auto`);
  `--dtype float32` turns autocast off. On CPU everything is float32.
- The policy is loaded with dropout off and kept in train mode (only gradient checkpointing depends on it).
- `--reference live` loads the frozen copy in the compute dtype (bf16 on GPU, float32 on CPU), as a precompute
  in that dtype would score it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefpipe.errors import UserError
from prefpipe.fileio import atomic_write_text
from prefpipe import rundir
from prefpipe.rundir import RunsDir, merge_summary
from prefpipe.train import checkpoint as ck
from prefpipe.train.batches import Order, eval_batches, load_train_data, make_batch, micro_batches, split_eval
from prefpipe.train.config import LossConfig, TrainConfig
from prefpipe.dist import Procs
from prefpipe.train.parallel import (load_optimizer_state, optimizer_state, process_device, start, wrap_policy,
                                 wrap_reference, full_state_dict)
from prefpipe.train.schedule import lr_factor
from prefpipe.train.objective import MetricSums, batch_loss, kl_terms, metric_names



@dataclass
class Context:
    """What every run of a sweep shares: loaded once."""
    cfg: TrainConfig
    procs: Procs
    device: torch.device
    compute_dtype: torch.dtype
    model_dir: str
    tokenizer: object
    data: object
    train_rows: list
    eval_rows: list
    ref_scorer: object = None
    validation: dict = field(default_factory=dict)
    log: object = print

    def autocast(self):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def _logger(procs: Procs):
    def log(msg: str):
        if procs.leader:
            from tqdm import tqdm
            tqdm.write(f"prefpipe train: {msg}", file=sys.stderr)
    return log


def run_training(cfg: TrainConfig) -> dict:
    """Run every (loss type, beta) of `cfg` in turn from one loaded cache; write and return the summary."""
    from prefpipe.data.fingerprint import resolve_model_dir
    from prefpipe.modeling import load_model, load_tokenizer, quiet_transformers, resolve_device, resolve_dtype

    quiet_transformers()
    device = process_device(resolve_device(cfg.device))
    compute_dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny models slowed 5-7x from denormals otherwise (REFERENCE 9)
    procs = start(device, cfg.fsdp)
    log = _logger(procs)
    try:
        runs = cfg.runs()
        kto = {r.loss_type == "kto" for r in runs}
        if len(kto) > 1:
            raise UserError("kto trains on a KTO cache of single examples, the other losses on pairs: run kto in "
                            "its own `prefpipe train`")
        model_dir = str(resolve_model_dir(cfg.source.model))
        tokenizer = load_tokenizer(model_dir)
        data = load_train_data(cfg.source, tokenizer, kto=kto.pop())
        for note in data.notes:
            log(note)
        if data.kind == "unpaired":
            from prefpipe.train.objective import kto_balance_warning
            warning = kto_balance_warning(data.table.column("label").to_pylist(), cfg.loss.desirable_weight,
                                          cfg.loss.undesirable_weight)
            if warning:
                log(warning)
        needs_ref = any(r.needs_reference for r in runs)
        cached_ref = needs_ref and cfg.source.reference == "cached"
        if cached_ref and cfg.source.data:
            needing = ", ".join(sorted({r.loss_type for r in runs if r.needs_reference}))
            raise UserError(f"--data gives token ids but no reference log-probs, and {needing} needs them: "
                            "precompute a cache and pass --cache, or use --reference live", file=cfg.source.data)
        if cached_ref and not data.has_reference:
            raise UserError("this cache has no reference log-probs (precompute --no_reference); train a "
                            "reference-free loss (orpo, sft), or use --reference live", file=data.origin)
        validation = {"tokenizer": "not checked (--data)", "model": "not checked", "drift": None}
        if data.metadata is not None:
            from prefpipe.train.validate import check_model, check_tokenizer
            validation["tokenizer"] = check_tokenizer(data, tokenizer)
            if cached_ref:
                validation["model"] = check_model(data, model_dir, cfg.source.allow_reference_mismatch, log)
        train_rows, eval_rows = split_eval(data, cfg.loop.eval_fraction)
        ref_scorer = None
        if needs_ref and cfg.source.reference == "live":
            # in the compute dtype, as precompute would score it: a bf16 copy on GPU, float32 on CPU
            ref_scorer = wrap_reference(load_model(model_dir, compute_dtype, device), cfg.fsdp)
        ctx = Context(cfg, procs, device, compute_dtype, model_dir, tokenizer, data, train_rows, eval_rows,
                      ref_scorer, validation, log)
        results = [train_one(ctx, loss) for loss in runs]
        summary = {"model": cfg.source.model, "cache": cfg.source.cache, "data": cfg.source.data,
                   "reference": cfg.source.reference if needs_ref else "none", "validation": validation,
                   "runs": results}
        if procs.leader:
            merge_summary(RunsDir(cfg.out), summary)
        return summary
    finally:
        procs.close()


def train_one(ctx: Context, loss: LossConfig) -> dict:
    """One run, from the SFT model (or its last checkpoint with --resume) to `<run>/final`."""
    from tqdm import tqdm

    from prefpipe.modeling import load_model

    cfg, procs, device, log = ctx.cfg, ctx.procs, ctx.device, ctx.log
    loop = cfg.loop
    rd = RunsDir(cfg.out).run(loss.run_name)
    run_dir, ckpt_root = rd.path, rd.checkpoints
    resolved = cfg.resolved(loss)
    t_start = time.perf_counter()

    # ---- the data order and the length of the run
    global_batch = loop.batch_size * loop.grad_accum * procs.world
    order = Order(tuple(ctx.train_rows), global_batch, loop.seed)
    if order.steps_per_epoch == 0:
        raise UserError(f"the training split has {len(ctx.train_rows)} rows, fewer than one global batch "
                        f"({loop.batch_size} x {loop.grad_accum} accumulation x {procs.world} processes = "
                        f"{global_batch}); lower --batch_size or --grad_accum")
    total = loop.max_steps or loop.epochs * order.steps_per_epoch
    warmup = math.ceil(cfg.optim.warmup_ratio * total)
    eval_every = loop.eval_every or max(1, total // 4)
    identity = {"loss": resolved["loss"], "optim": resolved["optim"], "seed": loop.seed, "steps": total,
                "global_batch": global_batch, "eval_fraction": loop.eval_fraction, "rows": len(ctx.data)}

    # ---- where to start: fresh, or the last checkpoint
    start_ckpt = None
    if procs.leader:
        ck.remove_leftovers(ckpt_root)
        ck.remove_leftovers(run_dir)
    procs.barrier()
    if rd.result.exists() and rd.final.exists() and loop.resume:
        log(f"{loss.run_name}: already finished; skipped (--resume)")
        return json.loads(rd.result.read_text())
    if loop.resume:
        start_ckpt = ck.latest_checkpoint(ckpt_root)
        if start_ckpt is None:
            log(f"{loss.run_name}: --resume found no checkpoint; starting from the beginning")
    elif rd.metrics.exists():
        raise UserError("this run directory already holds a run; pass --resume to continue it, or choose another "
                        "--out", file=str(run_dir))
    state = ck.load_trainer_state(start_ckpt) if start_ckpt else None
    if state is not None and state["identity"] != identity:
        diff = sorted(k for k in identity if state["identity"].get(k) != identity[k])
        raise UserError(f"--resume: the checkpoint was made with different settings ({', '.join(diff)}); use "
                        "the original options or another --out", file=str(start_ckpt))

    # ---- the policy
    torch.manual_seed(loop.seed)
    lm = load_model(str(start_ckpt) if start_ckpt else ctx.model_dir, torch.float32, device)
    if loop.gradient_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.train()  # dropout is 0 already; train mode keeps gradient checkpointing active
    policy = wrap_policy(lm, procs, device, cfg.fsdp)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.optim.lr_scheduler))
    pad_id = ctx.tokenizer.pad_token_id
    ref_scorer = ctx.ref_scorer if loss.needs_reference else None
    use_cached_ref = loss.needs_reference and ref_scorer is None

    step = 0
    if state is not None:
        load_optimizer_state(policy, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ck.set_rng_state(state["rng"])
        step = state["step"]
        log(f"{loss.run_name}: resuming after step {step} from {start_ckpt}")
    elif use_cached_ref and ctx.validation.get("drift") is None and cfg.source.drift_rows > 0:
        # ---- step-0 drift against the cached reference (once per sweep: every run starts from the same model)
        from prefpipe.train.validate import judge_drift, measure_drift, sample_rows
        rows = sample_rows(len(ctx.data), cfg.source.drift_rows)
        drift = measure_drift(policy.scorer, ctx.data, rows, loop.batch_size, pad_id, device, ctx.autocast())
        drift["max_drift"] = cfg.source.max_drift
        ctx.validation["drift"] = drift
        judge_drift(drift, cfg.source.max_drift, cfg.source.allow_reference_mismatch, ctx.data.origin, log)

    metrics_path = rd.metrics
    if procs.leader:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rd.config, json.dumps(resolved, indent=2, sort_keys=True))
        _truncate_metrics(metrics_path, step)
    names = metric_names(loss.loss_type)

    def evaluate(at_step: int) -> dict:
        return _evaluate(ctx, policy, ref_scorer, loss, names, use_cached_ref, at_step)

    def save(at_step: int):
        sd = full_state_dict(policy)
        opt = optimizer_state(policy, optimizer)
        if procs.leader:
            trainer_state = {"step": at_step, "epoch": at_step // order.steps_per_epoch,
                             "batch_in_epoch": at_step % order.steps_per_epoch, "identity": identity,
                             "optimizer": opt, "scheduler": scheduler.state_dict(), "rng": ck.rng_state()}
            ck.save_model_dir(rd.checkpoint(at_step), lm, ctx.tokenizer, resolved, sd,
                              trainer_state)
            ck.prune(ckpt_root, loop.keep_checkpoints)
        procs.barrier()

    log(f"{loss.run_name}: {total} steps of {global_batch} rows ({order.steps_per_epoch} steps per epoch; "
        f"{len(ctx.train_rows) % global_batch} rows sit out each epoch), {len(ctx.eval_rows)} eval rows, "
        f"reference {'live' if ref_scorer is not None else 'cached' if use_cached_ref else 'none'}, "
        f"{policy.mode} on {procs.world} process(es), {device}, compute {str(ctx.compute_dtype)[6:]}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total, initial=step, desc=loss.run_name, disable=not (procs.leader and cfg.progress),
               dynamic_ncols=True, file=sys.stderr)
    last, last_eval = None, None
    metrics_file = open(metrics_path, "a") if procs.leader else None
    try:
        while step < total:
            t0 = time.perf_counter()
            batches = [make_batch(ctx.data, rows, loss.loss_type, pad_id, device, use_cached_ref)
                       for rows in micro_batches(order.global_rows(step), loop.batch_size, loop.grad_accum,
                                                 procs.world, procs.rank)]
            n_global = global_batch

            # KTO: z0 over the whole global batch, every process, before any gradient
            z0 = None
            if loss.loss_type == "kto":
                kl = [kl_terms(b, policy.scorer, ref_scorer, ctx.autocast()) for b in batches]
                s, c = procs.sum([sum(float(k.double().sum()) for k in kl), float(sum(k.numel() for k in kl))],
                                 device)
                z0 = torch.tensor(max(0.0, s / c), dtype=torch.float32, device=device)

            sums = MetricSums()
            for k, b in enumerate(batches):
                with policy.sync(last_micro_batch=k == len(batches) - 1):
                    out = batch_loss(b, policy.train_module, ref_scorer, loss, ctx.autocast(), z0)
                    # per-example losses over the global batch; DDP/FSDP average gradients over processes
                    (out.losses.sum() * (procs.world / n_global)).backward()
                sums.add(out, b.tokens)
            max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(list(policy.parameters()), max_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            m = sums.reduce(procs, device, names)
            if m["loss"] is None or not math.isfinite(m["loss"]):
                raise UserError(f"{loss.run_name}: the loss is {m['loss']} at step {step}; lower --lr, or train "
                                "in float32")
            dt = time.perf_counter() - t0
            last = {"split": "train", "step": step, "epoch": round(step / order.steps_per_epoch, 4), **m,
                    "grad_norm": grad_norm, "lr": lr, "tokens_per_s": m["tokens"] / dt, "step_time_s": dt}
            if z0 is not None:
                last["kl"] = float(z0)  # the same on every process: it comes from global sums
            _write(metrics_file, last)
            bar.update(1)
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "acc", "margin", "kl", "nll")
                             if last.get(k) is not None}, refresh=False)

            if ctx.eval_rows and (step % eval_every == 0 or step == total):
                last_eval = evaluate(step)
                _write(metrics_file, last_eval)
            if loop.save_every and step % loop.save_every == 0 and step < total:
                save(step)
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()

    if ctx.eval_rows and last_eval is None:  # resumed at the very end, or an eval-less run continued
        last_eval = evaluate(step)
        _write_path(metrics_path, last_eval, procs)
    sd = full_state_dict(policy)
    if procs.leader:
        ck.save_model_dir(rd.final, lm, ctx.tokenizer, resolved, sd)
    if last is None:
        last = _last_train(metrics_path)
    result = {"name": loss.run_name, "dir": loss.run_name, "loss_type": loss.loss_type, "beta": loss.beta,
              "steps": total, "final": last, "eval": last_eval, "model_dir": f"{loss.run_name}/{rundir.FINAL}",
              "metrics": f"{loss.run_name}/{rundir.METRICS}", "wall_s": time.perf_counter() - t_start,
              "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2 ** 30) if device.type == "cuda"
              else None}
    if procs.leader:
        atomic_write_text(rd.result, json.dumps(result, indent=2))
    procs.barrier()
    log(f"{loss.run_name}: done, final model in {rd.final}")
    return result


@torch.no_grad()
def _evaluate(ctx: Context, policy, ref_scorer, loss, names, use_cached_ref, at_step) -> dict:
    """Metrics over the whole eval split (KTO: z0 over the whole split too)."""
    procs, device = ctx.procs, ctx.device
    pad_id = ctx.tokenizer.pad_token_id
    parts = [(make_batch(ctx.data, rows, loss.loss_type, pad_id, device, use_cached_ref), real)
             for rows, real in eval_batches(ctx.eval_rows, ctx.cfg.loop.batch_size, procs.world, procs.rank)]
    z0 = None
    if loss.loss_type == "kto":
        s = sum(float(kl_terms(b, policy.scorer, ref_scorer, ctx.autocast()).double().sum())
                for b, real in parts if real)
        n = sum(b.n for b, real in parts if real)
        # the padded batches of idle processes must still run (FSDP lockstep)
        for b, real in parts:
            if not real:
                kl_terms(b, policy.scorer, ref_scorer, ctx.autocast())
        s, n = procs.sum([s, float(n)], device)
        z0 = torch.tensor(max(0.0, s / n), dtype=torch.float32, device=device)
    sums = MetricSums()
    for b, real in parts:
        out = batch_loss(b, policy.scorer, ref_scorer, loss, ctx.autocast(), z0)
        if real:
            sums.add(out, b.tokens)
    m = sums.reduce(procs, device, names)
    m.pop("tokens", None)
    rec = {"split": "eval", "step": at_step, **m}
    if z0 is not None:
        rec["kl"] = float(z0)
    return rec


def _write(f, record: dict):
    if f is not None:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _write_path(path: Path, record: dict, procs: Procs):
    if procs.leader:
        with open(path, "a") as f:
            _write(f, record)


def _truncate_metrics(path: Path, step: int):
    """Drop lines past `step` (written by a killed run after its last checkpoint) before appending."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _last_train(path: Path) -> dict | None:
    last = None
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("split") == "train":
                last = rec
    return last
