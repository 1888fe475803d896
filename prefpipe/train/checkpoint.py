"""Checkpoints: Hugging Face model directories (a LoRA run: the PEFT adapter alone) plus the trainer state, written
atomically.

Where they go is `prefpipe.rundir`'s business. Every directory is written under a temporary name in the same
parent and renamed into place, so a killed run leaves either a whole checkpoint or none; leftovers are removed on
the next start. `trainer_state.pt` holds only tensors and plain Python values and is loaded with
`torch.load(weights_only=True)`: no pickled objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from prefpipe import modeling
from prefpipe.fileio import guarded_write
from prefpipe.rundir import CONFIG as CONFIG_FILE, TRAINER_STATE as STATE_FILE
from prefpipe.train.parallel import full_state_dict, optimizer_state


def remove_leftovers(parent: Path):
    """Temporary directories of a killed run."""
    if parent.exists():
        for p in parent.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def save_model_dir(dest: Path, lm, tokenizer, config: dict, state_dict: dict | None = None,
                   trainer_state: dict | None = None):
    """Write `dest` atomically: model + tokenizer + config (+ trainer state). Leader only."""
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    kept = (f"{'the previous ' + dest.name if dest.exists() else 'no ' + dest.name} is left there and the run's "
            "saved checkpoints are kept: free space, then rerun with --resume")
    with guarded_write(dest, kept, tmp=tmp):
        dest.parent.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if trainer_state is not None:
            with open(tmp / STATE_FILE, "wb") as f:  # a file object: a failed write keeps its OSError as context
                torch.save(trainer_state, f)
    if dest.exists():  # a rerun's final/ or a re-saved step: move the old one aside, then drop it
        old = dest.parent / f".tmp-old-{dest.name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    steps = sorted(p for p in ckpt_root.glob("step-*") if (p / STATE_FILE).exists()) if ckpt_root.exists() else []
    return steps[-1] if steps else None


def prune(ckpt_root: Path, keep: int):
    if keep <= 0:
        return
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for p in steps[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def save_checkpoint(rd, step: int, tr, plan, tokenizer, resolved: dict, procs, keep: int):
    """`<run>/checkpoints/step-NNNNNN`: the model and everything --resume needs to continue exactly after
    `step`. Every process must call this (FSDP gathers the shards); the leader writes."""
    sd = full_state_dict(tr.policy)
    opt = optimizer_state(tr.policy, tr.optimizer)
    if procs.leader:
        spe = plan.order.steps_per_epoch
        trainer_state = {"step": step, "epoch": step // spe, "batch_in_epoch": step % spe,
                         "identity": plan.identity, "optimizer": opt, "scheduler": tr.scheduler.state_dict(),
                         "rng": rng_state()}
        save_model_dir(rd.checkpoint(step), tr.lm, tokenizer, resolved, sd, trainer_state)
        prune(rd.checkpoints, keep)
    procs.barrier()


def save_final(rd, tr, tokenizer, resolved: dict, procs):
    """`<run>/final`: the trained model (a LoRA run: the adapter) with its tokenizer and config. Every process
    must call this.

    With `--merge` a LoRA run also writes `<run>/final-merged`: the leader loads `final/` afresh on the CPU in
    float32 (base, any SFT adapter, then this adapter, merged; so it costs one float32 copy of the model in host
    memory) and saves it as a plain Hugging Face model. Loading what was just written also proves that `final/`
    stands on its own."""
    sd = full_state_dict(tr.policy)
    if procs.leader:
        save_model_dir(rd.final, tr.lm, tokenizer, resolved, sd)
        if resolved.get("lora", {}).get("merge"):
            merged = modeling.load_model(str(rd.final), torch.float32, "cpu")
            save_model_dir(rd.final_merged, merged, tokenizer, resolved)
    procs.barrier()
