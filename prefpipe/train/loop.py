"""Phase two: `run_training(cfg) -> summary`, the loop behind `prefpipe train` (and the pipeline, in-process).

The pieces of a run: `setup.py` (the plan, where to start, the policy and optimizer, the drift check),
`step.py` (`train_step`: one optimizer step, no I/O), `evaluate.py`, `checkpoint.py` (checkpoints and the final
model), `metrics_log.py`; the loss comes from the registry in `registry.py` / `losses.py`.

Output files, all under `cfg.out` (RUNS_DIR):

    summary.json              {"caches": [every cache the runs below trained from], "runs": [RUN, ...]}
                              (merged across train calls: each RUN names its own sources)
    <loss>-beta<beta>/        one directory per run, `orpo/` and `sft/` for the losses without beta
                              (its files: prefpipe/rundir.py, the one owner of the layout)

RUN (also written alone to `<run>/result.json`):

    {"name": "dpo-beta0.1", "dir": "dpo-beta0.1", "loss_type": "dpo", "beta": 0.1, "steps": 120,
     "final": {train metrics of the last step}, "eval": {the last evaluation} or null,
     "model_dir": "dpo-beta0.1/final", "metrics": "dpo-beta0.1/metrics.jsonl", "wall_s": 81.2,
     "peak_memory_gb": null or CUDA peak allocated,
     "source": {"model", "cache", "data", "reference": "cached" | "live" | "none"}, "validation": {...}}

`run_training` returns this call's summary: {"model", "cache", "data", "reference", "validation", "runs"}.

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
from pathlib import Path

import torch

from prefpipe import modeling, rundir
from prefpipe.data.kto_pairs import kto_balance_warning
from prefpipe.dist import Procs
from prefpipe.errors import UserError
from prefpipe.fileio import OutputLock, atomic_write_text
from prefpipe.model_paths import resolve_model_dir
from prefpipe.progress_bar import progress_bar
from prefpipe.rundir import RunsDir, merge_summary
from prefpipe.tokenizer import load_tokenizer, quiet_transformers
from prefpipe.train import checkpoint as ck
from prefpipe.train.batches import RowsDataset, train_loader
from prefpipe.train.order import StepSampler
from prefpipe.train.train_data import load_train_data, split_eval
from prefpipe.train.config import LossConfig, TrainConfig
from prefpipe.train.eval_split import evaluate
from prefpipe.train.losses import LOSSES
from prefpipe.train.metrics_log import MetricsLog
from prefpipe.train.tracking import open_trackers
from prefpipe.train.validate import check_model, check_per_token, check_tokenizer
from prefpipe.packing import choose_packing
from prefpipe.train.parallel import process_device, start, wrap_reference
from prefpipe.train.setup import Context, Plan, Trainer, build_trainer, check_drift, find_start, plan_run
from prefpipe.train.step import train_step
from prefpipe.wording import plural

__all__ = ["Context", "run_training", "train_one"]


def _logger(procs: Procs):
    def log(msg: str):
        if procs.leader:
            from tqdm import tqdm
            tqdm.write(f"prefpipe train: {msg}", file=sys.stderr)
    return log


def run_training(cfg: TrainConfig) -> dict:
    """Run every (loss type, beta) of `cfg` in turn from one loaded cache; write and return the summary."""
    quiet_transformers()
    device = process_device(modeling.resolve_device(cfg.device))
    compute_dtype = modeling.resolve_dtype(cfg.dtype, device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny models slowed 5-7x from denormal floats otherwise
    procs = start(device, cfg.fsdp)
    # The leader holds RUNS_DIR for the whole call (taken before any model is loaded, so an --out that cannot be
    # written, or one another train is writing, is refused at once); the other ranks write under its lock.
    lock = OutputLock(cfg.out, "--out") if procs.leader else None
    try:
        if lock is not None:
            lock.acquire()
        runs = cfg.runs()
        ctx = _prepare(cfg, runs, procs, device, compute_dtype, _logger(procs))
        results = [train_one(ctx, loss) for loss in runs]
        needs_ref = any(r.needs_reference for r in runs)
        summary = {"model": cfg.source.model, "cache": cfg.source.cache, "data": cfg.source.data,
                   "reference": cfg.source.reference if needs_ref else "none", "validation": ctx.validation,
                   "runs": results}
        if procs.leader:
            merge_summary(RunsDir(cfg.out), summary)
        return summary
    finally:
        if lock is not None:
            lock.release()
        procs.close()


def _prepare(cfg: TrainConfig, runs: list, procs, device, compute_dtype, log) -> Context:
    """Load the data once for the sweep and check it: kinds, reference columns, tokenizer and model."""
    paired = {LOSSES[r.loss_type].paired for r in runs}
    if len(paired) > 1:
        raise UserError("kto trains on a KTO cache of single examples, the other losses on pairs: run kto in "
                        "its own `prefpipe train`")
    model_dir = str(resolve_model_dir(cfg.source.model))
    tokenizer = load_tokenizer(model_dir)
    data = load_train_data(cfg.source, tokenizer, kto=not paired.pop())
    for note in data.notes:
        log(note)
    if data.kind == "unpaired":
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
    check_per_token(data, runs, cfg.source.reference)
    validation = {"tokenizer": "not checked (--data)", "model": "not checked", "drift": None}
    if data.metadata is not None:
        validation["tokenizer"] = check_tokenizer(data, tokenizer)
        if cached_ref:
            validation["model"] = check_model(data, model_dir, cfg.source.allow_reference_mismatch, log)
    train_rows, eval_rows = split_eval(data, cfg.loop.eval_fraction)
    ref_scorer = None
    if needs_ref and cfg.source.reference == "live" and not cfg.lora.enabled:  # LoRA: see build_trainer
        # in the compute dtype, as precompute would score it: a bf16 copy on GPU, float32 on CPU
        ref_scorer = wrap_reference(modeling.load_model(model_dir, compute_dtype, device), cfg.fsdp)
    return Context(cfg, procs, device, compute_dtype, model_dir, tokenizer, data, train_rows, eval_rows,
                   ref_scorer, validation, log)


def train_one(ctx: Context, loss: LossConfig) -> dict:
    """One run, from the SFT model (or its last checkpoint with --resume) to `<run>/final`."""
    rd = RunsDir(ctx.cfg.out).run(loss.run_name)
    t_start = time.perf_counter()
    plan = plan_run(ctx, loss)
    begin = find_start(ctx, loss, rd, plan.identity)
    if begin.finished:
        ctx.log(f"{loss.run_name}: already finished; skipped (--resume)")
        return json.loads(rd.result.read_text())
    tr = build_trainer(ctx, plan, begin)
    choose_packing(tr.policy, ctx.cfg.loop.padding_free, ctx.device, ctx.log)
    ref_scorer = ctx.ref_scorer if loss.needs_reference else None
    use_cached_ref = loss.needs_reference and ref_scorer is None
    if begin.state is not None:
        ctx.log(f"{loss.run_name}: resuming after step {tr.step} from {begin.checkpoint}")
    elif use_cached_ref:
        check_drift(ctx, tr.policy)
    resolved = ctx.cfg.resolved(loss)
    if ctx.procs.leader:
        rd.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(rd.config, json.dumps(resolved, indent=2, sort_keys=True))
    tracker = open_trackers(ctx.cfg.report_to, rd.path, loss.run_name, resolved, leader=ctx.procs.leader,
                            start_step=tr.step, group=Path(ctx.cfg.out).name)
    mlog = MetricsLog(rd.metrics, ctx.procs.leader, tracker)
    _describe(ctx, loss, plan, tr, ref_scorer, use_cached_ref)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    mlog.open(tr.step)
    try:
        last, last_eval = _run_steps(ctx, loss, plan, tr, rd, mlog, ref_scorer, use_cached_ref, resolved)
        if ctx.eval_rows and last_eval is None:  # resumed at the very end, or an eval-less run continued
            last_eval = evaluate(ctx, tr.policy, ref_scorer, loss, use_cached_ref, tr.step)
            mlog.write(last_eval)
    except BaseException:
        mlog.close_trackers(failed=True)
        raise
    finally:
        mlog.close()
    mlog.close_trackers()
    ck.save_final(rd, tr, ctx.tokenizer, resolved, ctx.procs)
    return _finish(ctx, loss, rd, plan, last or mlog.last_train(), last_eval, time.perf_counter() - t_start)


def _run_steps(ctx: Context, loss: LossConfig, plan: Plan, tr: Trainer, rd, mlog: MetricsLog, ref_scorer,
               use_cached_ref: bool, resolved: dict) -> tuple[dict | None, dict | None]:
    """Steps `tr.step + 1 .. plan.total`, each logged, with evaluations and checkpoints on schedule."""
    cfg, procs, loop = ctx.cfg, ctx.procs, ctx.cfg.loop
    dataset = RowsDataset(ctx.data, LOSSES[loss.loss_type].batch, ctx.tokenizer.pad_token_id, use_cached_ref,
                          pack=tr.policy.packed)
    sampler = StepSampler(plan.order, tr.step, plan.total, loop.batch_size, loop.grad_accum, procs.world,
                          procs.rank)
    micro_batches = iter(train_loader(dataset, sampler, workers=1 if ctx.device.type == "cuda" else 0))
    bar = progress_bar(plan.total, loss.run_name, "step", show=procs.leader and cfg.progress, initial=tr.step)
    last = last_eval = None
    try:
        while tr.step < plan.total:
            t0 = time.perf_counter()
            batches = [next(micro_batches).to(ctx.device) for _ in range(loop.grad_accum)]
            m = train_step(tr.policy, tr.optimizer, tr.scheduler, batches, loss, procs, ref_scorer=ref_scorer,
                           autocast=ctx.autocast(), max_grad_norm=cfg.optim.max_grad_norm)
            tr.step += 1
            if m["loss"] is None or not math.isfinite(m["loss"]):
                fix = "lower --lr" if ctx.compute_dtype == torch.float32 else "lower --lr, or --dtype float32"
                raise UserError(f"{loss.run_name}: the loss is {m['loss']} at step {tr.step}; {fix}")
            dt = time.perf_counter() - t0
            last = {"split": "train", "step": tr.step, "epoch": round(tr.step / plan.order.steps_per_epoch, 4),
                    **m, "tokens_per_s": m["tokens"] / dt, "step_time_s": dt}
            mlog.write(last)
            # the postfix first: update() redraws the bar, which would otherwise show the previous step's metrics
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "acc", "margin", "kl", "nll")
                             if last.get(k) is not None}, refresh=False)
            bar.update(1)
            if ctx.eval_rows and (tr.step % plan.eval_every == 0 or tr.step == plan.total):
                last_eval = evaluate(ctx, tr.policy, ref_scorer, loss, use_cached_ref, tr.step)
                mlog.write(last_eval)
            if loop.save_every and tr.step % loop.save_every == 0 and tr.step < plan.total:
                ck.save_checkpoint(rd, tr.step, tr, plan, ctx.tokenizer, resolved, procs, loop.keep_checkpoints)
    finally:
        bar.close()
    return last, last_eval


def _describe(ctx: Context, loss: LossConfig, plan: Plan, tr: Trainer, ref_scorer, use_cached_ref: bool):
    ref = "live" if ref_scorer is not None else "cached" if use_cached_ref else "none"
    idle = len(ctx.train_rows) % plan.global_batch
    ctx.log(f"{loss.run_name}: {plural(plan.total, 'step')} of {plural(plan.global_batch, 'row')} "
            f"({plural(plan.order.steps_per_epoch, 'step')} per epoch; {plural(idle, 'row')} "
            f"sit{'s' if idle == 1 else ''} out each epoch), {plural(len(ctx.eval_rows), 'eval row')}, "
            f"reference {ref}, {tr.policy.mode} on {ctx.procs.world} process(es), "
            f"{ctx.device}, compute {str(ctx.compute_dtype)[6:]}")


def _source(cfg: TrainConfig, loss: LossConfig) -> dict:
    """What this run trained from: its entry in summary.json keeps it when a later train call adds other runs."""
    src = cfg.source
    return {"model": src.model, "cache": src.cache, "data": src.data,
            "reference": src.reference if loss.needs_reference else "none"}


def _finish(ctx: Context, loss: LossConfig, rd, plan: Plan, last: dict | None, last_eval: dict | None,
            wall_s: float) -> dict:
    """Write `<run>/result.json` (the run's entry in summary.json) and return it."""
    device = ctx.device
    result = {"name": loss.run_name, "dir": loss.run_name, "loss_type": loss.loss_type, "beta": loss.beta,
              "steps": plan.total, "final": last, "eval": last_eval, "model_dir": f"{loss.run_name}/{rundir.FINAL}",
              "metrics": f"{loss.run_name}/{rundir.METRICS}", "wall_s": wall_s,
              "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2 ** 30) if device.type == "cuda"
              else None, "source": _source(ctx.cfg, loss), "validation": dict(ctx.validation)}
    if ctx.procs.leader:
        atomic_write_text(rd.result, json.dumps(result, indent=2))
    ctx.procs.barrier()
    ctx.log(f"{loss.run_name}: done, final model in {rd.final}")
    return result
