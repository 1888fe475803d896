"""Everything a run needs before its first step: the shared context of a sweep, the run's plan (data order,
length, schedule), where it starts (fresh or the last checkpoint), and the policy with its optimizer."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prefpipe import modeling
from prefpipe.dist import Procs
from prefpipe.errors import UserError
from prefpipe.fileio import remove_tree
from prefpipe.train import checkpoint as ck
from prefpipe.train.order import Order
from prefpipe.train.config import LossConfig, OptimConfig, TrainConfig
from prefpipe.train.lora import AdapterOffReference, add_adapter
from prefpipe.train.parallel import Policy, load_optimizer_state, wrap_policy
from prefpipe.train.schedule import lr_factor
from prefpipe.train.validate import judge_drift, measure_drift, sample_rows
from prefpipe.wording import plural


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


@dataclass(frozen=True)
class Plan:
    """The data order and length of one run, and the settings a checkpoint must match to be resumed."""
    order: Order
    global_batch: int
    total: int
    warmup: int
    eval_every: int
    identity: dict


def plan_run(ctx: Context, loss: LossConfig) -> Plan:
    cfg, loop, world = ctx.cfg, ctx.cfg.loop, ctx.procs.world
    global_batch = loop.batch_size * loop.grad_accum * world
    order = Order(ctx.train_rows, global_batch, loop.seed)  # split_eval gives a compact array
    if order.steps_per_epoch == 0:
        raise UserError(f"the training split has {plural(len(ctx.train_rows), 'row')}, fewer than one global "
                        f"batch ({loop.batch_size} x {loop.grad_accum} accumulation x "
                        f"{plural(world, 'process', 'processes')} = "
                        f"{global_batch}); lower --batch_size or --grad_accum")
    total = loop.max_steps or loop.epochs * order.steps_per_epoch
    resolved = cfg.resolved(loss)
    identity = {"loss": resolved["loss"], "optim": resolved["optim"], "seed": loop.seed, "steps": total,
                "global_batch": global_batch, "eval_fraction": loop.eval_fraction, "rows": len(ctx.data)}
    if cfg.lora.enabled:  # only then, so that full fine-tune checkpoints of earlier versions still resume
        identity["lora"] = {k: v for k, v in resolved["lora"].items() if k != "merge"}
    return Plan(order, global_batch, total, math.ceil(cfg.optim.warmup_ratio * total),
                loop.eval_every or max(1, total // 4), identity)


@dataclass
class Start:
    finished: bool = False  # --resume of a run that already wrote its final model
    checkpoint: Path | None = None
    state: dict | None = None  # the checkpoint's trainer state


def find_start(ctx: Context, loss: LossConfig, rd, identity: dict) -> Start:
    """Fresh, or the last checkpoint with --resume (whose settings must match `identity`)."""
    procs, loop, log = ctx.procs, ctx.cfg.loop, ctx.log
    if procs.leader:
        ck.remove_leftovers(rd.checkpoints)
        ck.remove_leftovers(rd.path)
    procs.barrier()
    if rd.result.exists() and rd.final.exists() and loop.resume:
        return Start(finished=True)
    if not loop.resume:
        if rd.metrics.exists() and loop.overwrite:
            if procs.leader:
                log(f"{loss.run_name}: --overwrite: replacing the earlier run in {rd.path}")
                remove_tree(rd.path)
            procs.barrier()
        elif rd.metrics.exists():
            raise UserError("this run directory already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or choose another --out", file=str(rd.path))
        return Start()
    ckpt = ck.latest_checkpoint(rd.checkpoints)
    if ckpt is None:
        log(f"{loss.run_name}: --resume found no checkpoint; starting from the beginning")
        return Start()
    state = ck.load_trainer_state(ckpt)
    diff = _settings_differ(state["identity"], identity)
    if diff:
        raise UserError(f"--resume: the checkpoint was made with different settings ({', '.join(diff)}); use "
                        "the original options or another --out", file=str(ckpt))
    return Start(checkpoint=ckpt, state=state)


def _settings_differ(saved: dict, now: dict) -> list[str]:
    """Names of the settings in which a checkpoint's identity differs from this run's. A loss or optimizer
    setting the checkpoint does not record (it predates that option) counts as equal when this run leaves it at
    its default, so checkpoints of earlier versions still resume."""
    defaults = {"loss": asdict(LossConfig()), "optim": asdict(OptimConfig())}
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if key in defaults and isinstance(a, dict) and isinstance(b, dict):
            missing = {k: defaults[key].get(k, object()) for k in b.keys() - a.keys()}
            if {**missing, **a} != b:
                out.append(key)
        elif a != b:
            out.append(key)
    return out


@dataclass
class Trainer:
    """The trained state of a run: the model, its wrapping, the optimizer and schedule, and the steps done."""
    lm: torch.nn.Module
    policy: Policy
    optimizer: torch.optim.Optimizer
    scheduler: object
    step: int = 0


def build_trainer(ctx: Context, plan: Plan, start: Start) -> Trainer:
    """The float32 policy (from the SFT model or the checkpoint), AdamW and the lr schedule, with the
    checkpoint's optimizer, schedule and RNG state restored.

    With `--lora_r` the policy is the SFT model with a peft adapter (from the checkpoint on resume) and AdamW sees
    only the adapter; with `--reference live` the run's reference (`ctx.ref_scorer`) is then this same model with
    the adapter disabled (see prefpipe.train.lora)."""
    cfg, loop = ctx.cfg, ctx.cfg.loop
    torch.manual_seed(loop.seed)
    lm = _load_policy(ctx, start.checkpoint)
    policy = wrap_policy(lm, ctx.procs, ctx.device, cfg.fsdp)
    if cfg.lora.enabled and cfg.source.reference == "live":
        ctx.ref_scorer = AdapterOffReference(lm, policy.scorer)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.total, plan.warmup, cfg.optim.lr_scheduler))
    tr = Trainer(lm, policy, optimizer, scheduler)
    if start.state is not None:
        load_optimizer_state(policy, optimizer, start.state["optimizer"])
        scheduler.load_state_dict(start.state["scheduler"])
        ck.set_rng_state(start.state["rng"])
        tr.step = start.state["step"]
    return tr


def _load_policy(ctx: Context, checkpoint: Path | None):
    """The transformers model to train (in train mode, gradient checkpointing on if asked), or with LoRA the
    PeftModel around the SFT model."""
    cfg, loop = ctx.cfg, ctx.cfg.loop
    if cfg.lora.enabled:
        ctx.ref_scorer = None  # the previous run's model, if any: let it go before loading this one
        lm = modeling.load_model(ctx.model_dir, torch.float32, ctx.device, load_in_4bit=cfg.lora.load_in_4bit,
                        compute_dtype=ctx.compute_dtype)
    else:
        lm = modeling.load_model(str(checkpoint) if checkpoint else ctx.model_dir, torch.float32, ctx.device)
    if loop.gradient_checkpointing:
        if hasattr(lm, "activation_checkpointing_enable"):  # the name from transformers 5.x on
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        lm = add_adapter(lm, cfg.lora, ctx.model_dir, checkpoint)
    lm.train()  # dropout is 0 already (LoRA's by default); train mode keeps gradient checkpointing active
    return lm


def check_drift(ctx: Context, policy: Policy):
    """Step-0 drift of the policy against the cached reference, once per sweep (every run starts from the same
    model); stops the run above --max_drift (see validate.py)."""
    src = ctx.cfg.source
    if ctx.validation.get("drift") is not None or src.drift_rows <= 0:
        return
    rows = sample_rows(len(ctx.data), src.drift_rows)
    drift = measure_drift(policy.scorer, ctx.data, rows, ctx.cfg.loop.batch_size, ctx.tokenizer.pad_token_id,
                          ctx.device, ctx.autocast())
    drift["max_drift"] = src.max_drift
    ctx.validation["drift"] = drift
    judge_drift(drift, src.max_drift, src.allow_reference_mismatch, ctx.data.origin, log=ctx.log)
