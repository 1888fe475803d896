"""Processes and model wrapping: single process, DDP, or FSDP2, all behind one `Scorer` module.

DDP synchronises gradients only for computations that go through the wrapped module's `forward`, and FSDP
gathers parameters in forward hooks; `sequence_logprobs` reaches into the decoder and LM head directly. So the
policy is wrapped in `Scorer`, whose `forward` calls `sequence_logprobs(self.lm, ...)`, and *that* module is what
DDP or `fully_shard` wraps.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from prefpipe.dist import Procs, join, under_torchrun
from prefpipe.errors import UserError
from prefpipe.logprobs import sequence_logprobs
from prefpipe.train.lora import is_peft, transformers_model


def start(device: torch.device, fsdp: bool = False) -> Procs:
    """Join the torchrun group if there is one: gloo on CPU, nccl on GPU. FSDP needs a group even for one
    process (its device mesh lives in it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp and not under_torchrun():
        raise UserError("--fsdp shards the model over torchrun's processes: launch with "
                        "`torchrun --nproc_per_node=N -m prefpipe train ... --fsdp`")
    if world <= 1 and not fsdp:
        return Procs()
    return join("nccl" if device.type == "cuda" else "gloo", datetime.timedelta(minutes=30))


def process_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its local rank."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return device


class Scorer(nn.Module):
    """`forward(ids, mask, prompt_lens) -> Scores`: the shared `sequence_logprobs` on `self.lm`.
    `seq_lens=` switches to the packed layout (`ids` one row, `mask` None). With `extras` (see
    `sequence_logprobs`: "tokens", "log_sum_sq") `Scores.extras` holds them (`{name: [B, n]}`), still from this
    one forward, so DDP and FSDP see the per-token outputs too."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, prompt_lens, seq_lens=None, extras: tuple = ()):
        return sequence_logprobs(self.lm, input_ids, attention_mask, prompt_lens, seq_lens=seq_lens,
                                 extras=tuple(extras))


def _shard(scorer: Scorer):
    from torch.distributed.fsdp import fully_shard
    # Each decoder layer is its own FSDP unit (gathered just before it runs); embeddings, final norm and LM head
    # belong to the root unit.
    layer_names = set(getattr(scorer.lm, "_no_split_modules", None) or ())
    layers = [m for m in scorer.lm.modules() if type(m).__name__ in layer_names]
    if not layers:
        raise UserError(f"--fsdp: cannot find the decoder layers of {type(scorer.lm).__name__}")
    for layer in layers:
        fully_shard(layer)
    fully_shard(scorer)


@dataclass
class Policy:
    """The trainable model in its three guises.

    `lm` is the transformers model, or the PeftModel of a LoRA run (for saving), `scorer` the module to call without gradients (under FSDP the
    sharded root itself), `train_module` the module to call with gradients (DDP's wrapper, or `scorer`).
    """
    lm: nn.Module
    scorer: nn.Module
    train_module: nn.Module
    mode: str  # "single" | "ddp" | "fsdp"
    packed: bool = False  # batches arrive packed (`choose_packing`)

    def sync(self, last_micro_batch: bool):
        """DDP all-reduces gradients only on the last micro-batch of an accumulated step."""
        if self.mode == "ddp" and not last_micro_batch:
            return self.train_module.no_sync()
        return nullcontext()

    def parameters(self):
        return self.train_module.parameters()


def wrap_policy(lm: nn.Module, procs: Procs, device: torch.device, fsdp: bool) -> Policy:
    """`lm` may be a PeftModel: the scorer then runs the transformers model inside it (adapter layers and all)."""
    if fsdp and getattr(lm, "is_loaded_in_4bit", False):
        raise UserError("--fsdp with --load_in_4bit is not supported; use DDP (torchrun without --fsdp)")
    scorer = Scorer(transformers_model(lm))
    if fsdp:
        _shard(scorer)
        return Policy(lm, scorer, scorer, "fsdp")
    if procs.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        return Policy(lm, scorer, DDP(scorer, device_ids=ids), "ddp")
    return Policy(lm, scorer, scorer, "single")


def wrap_reference(lm: nn.Module, fsdp: bool) -> nn.Module:
    """The frozen live reference: no gradients, no DDP (nothing to synchronise); sharded too under --fsdp."""
    lm.eval().requires_grad_(False)
    scorer = Scorer(lm)
    if fsdp:
        _shard(scorer)
    return scorer


def full_state_dict(policy: Policy) -> dict | None:
    """The policy's weights, gathered in full on the leader (every process must call this under FSDP)."""
    if policy.mode != "fsdp":
        return None  # save_pretrained reads the unsharded model itself
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(policy.scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = "base_model.model." if is_peft(policy.lm) else ""  # a PeftModel's own key names
    return {prefix + k.removeprefix("lm."): v for k, v in sd.items()}


def optimizer_state(policy: Policy, optimizer) -> dict:
    """Optimizer state to save (full, on the leader; every process must call this under FSDP)."""
    if policy.mode != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(policy.scorer, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(policy: Policy, optimizer, state: dict):
    if policy.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(policy.scorer, optimizer, state, options=StateDictOptions(full_state_dict=True))
