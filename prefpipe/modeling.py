"""Loading models and tokenizers the way both phases need them.

Both loaders pass ``--model`` through `prefpipe.model_paths.model_ref` first, so a mistyped local path, or a
hub id that is not cached while offline, fails at once with one line instead of after the hub client's retries.

A PEFT adapter directory (``adapter_config.json`` naming ``base_model_name_or_path``) is a model too: the base is
loaded (recursively, so the base may itself be an adapter directory), the adapter is merged into it in float32,
and the result is cast to the asked dtype. So an SFT model shipped as base + LoRA adapter is the reference of
precompute, the policy's starting point and the evaluated model everywhere, never the bare base. Its tokenizer
is the adapter directory's own when it has one, else the base's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from prefpipe.attention import install as install_block_attention
from prefpipe.errors import UserError
from prefpipe.model_paths import adapter_base, is_adapter_dir, model_ref

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_model(model: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
               load_in_4bit: bool = False, compute_dtype: torch.dtype | None = None):
    """Load a causal LM (or a PEFT adapter directory, merged into its base) with every dropout probability 0.

    Established trainers disable dropout in the policy too, so that at step 0 the policy's log-probs equal the
    cached reference's (to float32 round-off). An sdpa model gets prefpipe's block attention
    (`prefpipe.attention`): the same sdpa on ordinary batches, and no wasted work on packed rows. `load_in_4bit` quantizes the linear weights to NF4 with
    bitsandbytes (CUDA only; the other weights stay `dtype`, the 4-bit matmuls run in `compute_dtype`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model = model_ref(str(model))
    quant = four_bit_config(device, compute_dtype or dtype) if load_in_4bit else None
    if is_adapter_dir(model):
        if load_in_4bit:
            raise UserError("--load_in_4bit with an adapter directory as the model: merge the adapter into its "
                            "base first (the merge needs full-precision weights)", file=model)
        return _load_merged_adapter(model, dtype, device)
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config ({str(e).splitlines()[0]})", file=model)
    for key, value in list(config.to_dict().items()):
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    if quant is not None:
        m = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=dtype, quantization_config=quant,
                                                 device_map={"": torch.device(device)})
    else:
        m = AutoModelForCausalLM.from_pretrained(model, config=config, dtype=dtype).to(device)
    install_block_attention(m)
    return m


def _load_merged_adapter(adapter_dir: str, dtype: torch.dtype, device):
    """Base + adapter, merged in float32 on `device`, then cast to `dtype`."""
    from peft import PeftModel

    base = load_model(adapter_base(adapter_dir), torch.float32, device)
    try:
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load the PEFT adapter ({str(e).splitlines()[0]})", file=adapter_dir)
    merged.config.name_or_path = str(Path(adapter_dir).resolve())
    return merged.to(dtype=dtype)


def four_bit_config(device, compute_dtype: torch.dtype):
    """bitsandbytes' NF4 settings (QLoRA's), or a one-line error where they cannot run."""
    device = torch.device(device)
    if device.type != "cuda":
        raise UserError(f"--load_in_4bit needs a CUDA GPU (bitsandbytes' 4-bit kernels); this run is on {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("--load_in_4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)
