"""The scoring-backend contract of phase one.

A backend turns (prompt ids, response ids) pairs into summed response log-probs (and, for `--per_token`, the
per-token values too). The precompute driver owns
everything else (reading, tokenizing, KTO partners, parts, resume, sharding), so a backend is only an engine.
Both backends score the exact ids they are given; neither may re-tokenize text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from prefpipe.options import DTYPES, opt


@dataclass(frozen=True)
class BackendOptions:
    """The engine's share of `prefpipe precompute`'s options."""
    model: str = opt(help="Frozen SFT model directory (or hub id): the reference.", path=True)
    dtype: str = opt("auto", choices=DTYPES, help="auto: bf16 on GPUs that support it, float32 on CPU.")
    device: str = opt("auto", help="hf: auto, cpu, cuda or cuda:N.")
    batch_tokens: int = opt(16384, help="hf: tokens per forward (padded tokens of length-sorted batches, or "
                            "packed tokens with --prompt_once).")
    prompt_once: bool = opt(True, help="hf: score both responses of a row in one packed forward that runs the "
                            "prompt once (sdpa models; others fall back with a warning).",
                            off_help="hf: score each response in its own forward (the prompt runs once per "
                            "response).")
    load_in_4bit: bool = opt(False, help="hf: load the reference in 4-bit NF4 (QLoRA's base; CUDA and "
                             "bitsandbytes only).")
    tensor_parallel_size: int = opt(1, help="vllm: GPUs per engine.")
    gpu_memory_utilization: float = opt(0.85, help="vllm: fraction of GPU memory the engine may take.")
    max_model_len: int | None = opt(None, help="vllm: engine context length.", default_text="--max_length")
    chunk_rows: int = opt(256, help="vllm: requests per engine call (bounds prompt-logprob memory).")
    # Not an option: precompute's --max_length, the longest sequence a backend is given (hf: whether a sliding
    # window can bind, `prefpipe.attention.window_binds`); None when unknown.
    max_length: int | None = None


class Backend(Protocol):
    name: str

    def provenance(self) -> dict:
        """What goes into the cache metadata's `backend` entry: at least name, version, dtype."""

    def score(self, prompts: list[list[int]], responses: list[list[int]], per_token: bool = False) -> tuple:
        """Summed log-probs of each `responses[i]` after `prompts[i]`, and the token counts, in input order:
        `(sums, counts)`. With `per_token=True`, `(sums, counts, tokens)`: `tokens[i]` is the list of
        `responses[i]`'s per-token log-probs (floats, in order), from the same forward as the sum."""

    # Optional: `score_pairs(prompts, firsts, seconds, per_token=False)` returns `(sums, counts, tokens)` (tokens
    # None unless asked for) with what `score(prompts + prompts, firsts + seconds, per_token)` would give, running
    # each prompt once; the driver uses it when a backend has it.

    def close(self) -> None:
        """Release the engine."""


# `--backend NAME` -> the class that implements it, as "module:Class" so that this module imports no backend (each
# backend imports this one) and an engine's heavy imports happen only when it is chosen. A new backend is one
# module plus one entry here.
BACKENDS = {
    "hf": "prefpipe.precompute.hf_backend:HFBackend",
    "vllm": "prefpipe.precompute.vllm_backend:VLLMBackend",
}


def make_backend(name: str, options: BackendOptions) -> Backend:
    import importlib

    if name not in BACKENDS:
        from prefpipe.errors import UserError
        raise UserError(f"unknown backend {name!r}; choose {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(options)
