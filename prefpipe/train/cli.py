"""`prefpipe train`: phase two from the command line. The work is `prefpipe.train.loop.run_training`."""

from __future__ import annotations

import click

from prefpipe.data.options import columns_from, data_options, tokenize_options
from prefpipe.train.config import SCHEDULERS, LoopConfig, LossConfig, OptimConfig, SourceConfig, TrainConfig
from prefpipe.train.losses import LOSS_TYPES


@click.command()
@click.option("--model", required=True, help="The SFT model directory (or hub id): the policy starts here.")
@click.option("--cache", default=None, help="Cache directory written by `prefpipe precompute`.")
@click.option("--data", default=None,
              help="Preference data to tokenize directly (reference-free losses, or --reference live).")
@click.option("--loss_type", "loss_types", multiple=True, default=("dpo",), show_default=True,
              type=click.Choice(LOSS_TYPES), help="Repeat to run several losses one after another.")
@click.option("--beta", "betas", multiple=True, type=float, default=(0.1,), show_default=True,
              help="Repeat for a beta sweep: one run per value, from the one loaded cache.")
@click.option("--out", required=True,
              help="RUNS_DIR: each run goes to RUNS_DIR/<loss>-beta<beta>/ (orpo, sft: RUNS_DIR/<loss>/).")
@click.option("--reference", type=click.Choice(["cached", "live"]), default="cached", show_default=True,
              help="cached: reference log-probs from the cache. live: a frozen copy of --model scores every batch.")
@click.option("--lr", type=float, default=OptimConfig.lr, show_default=True)
@click.option("--weight_decay", type=float, default=OptimConfig.weight_decay, show_default=True)
@click.option("--batch_size", type=int, default=LoopConfig.batch_size, show_default=True,
              help="Rows (pairs, or KTO examples) per micro-batch per process.")
@click.option("--grad_accum", type=int, default=LoopConfig.grad_accum, show_default=True)
@click.option("--epochs", type=int, default=LoopConfig.epochs, show_default=True)
@click.option("--max_steps", type=int, default=None, help="Optimizer steps; overrides --epochs.")
@click.option("--warmup_ratio", type=float, default=OptimConfig.warmup_ratio, show_default=True)
@click.option("--lr_scheduler", type=click.Choice(SCHEDULERS), default=OptimConfig.lr_scheduler, show_default=True)
@click.option("--max_grad_norm", type=float, default=OptimConfig.max_grad_norm, show_default=True,
              help="Clip the global gradient norm (0: no clipping).")
@click.option("--seed", type=int, default=LoopConfig.seed, show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Compute dtype (autocast); weights and optimizer stay float32. auto: bf16 on "
              "GPU, float32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--gradient_checkpointing", is_flag=True, help="Recompute activations in backward to save memory.")
@click.option("--fsdp", is_flag=True, help="Shard the policy (and a live reference) with FSDP2 under torchrun.")
@click.option("--eval_fraction", type=float, default=0.0, show_default=True,
              help="Hold out this fraction of rows (by row-id hash) and evaluate on them.")
@click.option("--eval_every", type=int, default=None, help="Steps between evaluations [default: a quarter of the "
              "run]; there is always one at the end.")
@click.option("--save_every", type=int, default=0, show_default=True,
              help="Checkpoint every N steps (0: only the final model).")
@click.option("--keep_checkpoints", type=int, default=0, show_default=True,
              help="Keep only the newest N checkpoints (0: keep all).")
@click.option("--resume", is_flag=True, help="Continue each run from its last checkpoint; finished runs are skipped.")
@click.option("--label_smoothing", type=float, default=0.0, show_default=True,
              help="dpo: conservative DPO, the label is assumed flipped with this probability.")
@click.option("--desirable_weight", type=float, default=1.0, show_default=True, help="kto: lambda_D.")
@click.option("--undesirable_weight", type=float, default=1.0, show_default=True, help="kto: lambda_U.")
@click.option("--orpo_lambda", type=float, default=1.0, show_default=True,
              help="orpo: weight of the odds-ratio term.")
@click.option("--allow_reference_mismatch", is_flag=True,
              help="Train against a cache made from another model; the step-0 drift is then only logged.")
@click.option("--max_drift", type=float, default=SourceConfig.max_drift, show_default=True,
              help="Stop when the step-0 policy differs from the cached reference by more than this many nats "
              "per response token (mean absolute).")
@click.option("--drift_rows", type=int, default=SourceConfig.drift_rows, show_default=True,
              help="Rows scored for the step-0 drift check (0: skip it).")
@click.option("--no_progress", is_flag=True, help="No progress bar.")
@data_options
@tokenize_options
def train(model, cache, data, loss_types, betas, out, reference, lr, weight_decay, batch_size, grad_accum, epochs,
          max_steps, warmup_ratio, lr_scheduler, max_grad_norm, seed, dtype, device, gradient_checkpointing, fsdp,
          eval_fraction, eval_every, save_every, keep_checkpoints, resume, label_smoothing, desirable_weight,
          undesirable_weight, orpo_lambda, allow_reference_mismatch, max_drift, drift_rows, no_progress,
          turn_marker, max_length, max_prompt_length, **cols):
    """Phase two: train the policy against the cached reference log-probs.

    \b
    prefpipe train --model SFT --cache CACHE --loss_type dpo --beta 0.1 --beta 0.3 --out RUNS
    prefpipe train --model SFT --data pairs.jsonl --loss_type orpo --out RUNS
    torchrun --nproc_per_node=2 -m prefpipe train ...   (data-parallel; add --fsdp to shard)
    """
    from prefpipe.train.loop import run_training
    from prefpipe.train.summary import format_summary

    source = SourceConfig(model=model, cache=cache, data=data, reference=reference,
                          allow_reference_mismatch=allow_reference_mismatch, max_drift=max_drift,
                          drift_rows=drift_rows, columns=columns_from(cols), turn_marker=turn_marker,
                          max_length=max_length, max_prompt_length=max_prompt_length)
    cfg = TrainConfig(
        source=source, out=out, loss_types=tuple(loss_types), betas=tuple(betas),
        loss=LossConfig(loss_types[0], betas[0], label_smoothing, desirable_weight, undesirable_weight, orpo_lambda),
        optim=OptimConfig(lr, weight_decay, warmup_ratio, lr_scheduler, max_grad_norm),
        loop=LoopConfig(batch_size, grad_accum, epochs, max_steps, seed, eval_fraction, eval_every, save_every,
                        keep_checkpoints, resume, gradient_checkpointing),
        dtype=dtype, device=device, fsdp=fsdp, progress=not no_progress)
    summary = run_training(cfg)
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(format_summary(summary))
