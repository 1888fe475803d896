"""Loading models and tokenizers the way both phases need them.

Both loaders pass ``--model`` through `prefpipe.data.fingerprint.model_ref` first, so a mistyped local path, or a
hub id that is not cached while offline, fails at once with one line instead of after the hub client's retries.
"""

from __future__ import annotations

import os

import torch

from prefpipe.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers():
    """Silence transformers' per-load progress bars and advisory warnings in CLI output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for, but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPUs that support it and float32 on CPU (bf16 matmuls are very slow on most CPUs)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    from prefpipe.data.fingerprint import model_ref
    model = model_ref(str(model))  # a mistyped path fails here, not after the hub client's retries
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer ({str(e).splitlines()[0]})", file=model)
    if tok.pad_token_id is None:
        # Padding is masked out everywhere; any id works, and EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load a causal LM with every dropout probability set to 0.

    Established trainers disable dropout in the policy too, so that at step 0 the policy's log-probs equal the
    cached reference's (to float32 round-off).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefpipe.data.fingerprint import model_ref
    model = model_ref(str(model))
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config ({str(e).splitlines()[0]})", file=model)
    for key, value in list(config.to_dict().items()):
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    m = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=dtype)
    return m.to(device)
