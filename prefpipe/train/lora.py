"""LoRA training with peft: the adapter on the frozen SFT model, and the live reference that is that same model with
the adapter switched off.

Decisions a user may want to know:

- The adapter goes on the SFT model as `prefpipe.modeling.load_model` loads it. When `--model` is itself a PEFT
  adapter directory (base + SFT adapter), the SFT adapter is merged into the base first and the new adapter is
  trained on top of the merged weights; the new adapter's `base_model_name_or_path` names the SFT adapter
  directory (absolute path), so loading `final/` rebuilds base + SFT adapter + new adapter, never the bare base.
- Only the adapter is trainable; checkpoints and `final/` hold the adapter (PEFT format) and the optimizer state
  of its parameters, not the frozen weights.
- `--reference live` with LoRA loads no second model: the reference forward is the policy's own forward inside
  `disable_adapter()`, which is exactly the SFT model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prefpipe.errors import UserError


def peft_config(cfg):
    """A `peft.LoraConfig` from prefpipe's `LoraConfig` group."""
    from peft import LoraConfig as PeftLoraConfig
    targets = cfg.lora_target_modules
    return PeftLoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r,
                          lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM",
                          target_modules="all-linear" if targets == ("all-linear",) else list(targets))


def add_adapter(lm, cfg, model_dir: str, checkpoint: Path | None = None):
    """`lm` (the loaded SFT model) with a trainable adapter: a fresh one, or the one saved in `checkpoint`."""
    from peft import PeftModel, get_peft_model

    if getattr(lm, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
    if checkpoint is not None:
        try:
            peft_lm = PeftModel.from_pretrained(lm, str(checkpoint), is_trainable=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"cannot load the checkpoint's LoRA adapter ({str(e).splitlines()[0]})",
                            file=str(checkpoint))
    else:
        try:
            peft_lm = get_peft_model(lm, peft_config(cfg))
        except ValueError as e:
            raise UserError(f"--lora_target_modules: {str(e).splitlines()[0]}")
    # PEFT records the base's own path, which for a merged SFT adapter is the bare base: name the SFT model.
    peft_lm.peft_config["default"].base_model_name_or_path = str(Path(model_dir).resolve()) \
        if Path(model_dir).is_dir() else model_dir
    return peft_lm


def is_peft(lm) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(lm, PeftModel)


def transformers_model(lm):
    """The transformers model inside a PeftModel (its linear layers carry the adapter), or `lm` itself."""
    return lm.get_base_model() if is_peft(lm) else lm


class AdapterOffReference:
    """The live reference of a LoRA run: `scorer` (the policy's no-gradient scorer) inside
    `peft_lm.disable_adapter()`. A plain callable, not a module, so it adds no parameters anywhere."""

    def __init__(self, peft_lm, scorer):
        self.peft_lm = peft_lm
        self.scorer = scorer

    def __call__(self, input_ids, attention_mask, prompt_lens, **kwargs):
        with torch.no_grad(), self.peft_lm.disable_adapter():
            return self.scorer(input_ids, attention_mask, prompt_lens, **kwargs)
