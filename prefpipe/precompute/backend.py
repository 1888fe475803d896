"""The scoring-backend contract of phase one.

A backend turns (prompt ids, response ids) pairs into summed response log-probs. The precompute driver owns
everything else (reading, tokenizing, KTO partners, parts, resume, sharding), so a backend is only an engine.
Both backends score the exact ids they are given; neither may re-tokenize text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BackendOptions:
    """Maps one-to-one to `prefpipe precompute` options."""
    model: str
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # hf only: auto | cpu | cuda | cuda:N
    batch_tokens: int = 16384  # hf only: padded tokens per forward
    tensor_parallel_size: int = 1  # vllm only
    gpu_memory_utilization: float = 0.85  # vllm only
    max_model_len: int | None = None  # vllm only; defaults to the run's --max_length
    chunk_rows: int = 256  # vllm only: requests submitted per engine call (bounds prompt-logprob memory)


class Backend(Protocol):
    name: str

    def provenance(self) -> dict:
        """What goes into the cache metadata's `backend` entry: at least name, version, dtype."""

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[list[float], list[int]]:
        """Summed log-probs of each `responses[i]` after `prompts[i]`, and the token counts, in input order."""

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
