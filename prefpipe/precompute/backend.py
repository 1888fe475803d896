"""The scoring-backend contract of phase one: `Backend`, its options, and the registry of backends.

A backend turns (prompt ids, response ids) pairs into summed response log-probs (and, for `--per_token`, the
per-token values too). The precompute driver owns everything else (reading, tokenizing, KTO partners, parts,
resume, sharding), so a backend is only an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from prefpipe.errors import UserError
from prefpipe.options import DTYPES, OptionError, check_choices, opt
from prefpipe.scores import Scores


@dataclass(frozen=True)
class BackendOptions:
    """The engine's share of `prefpipe precompute`'s options (a group of `PrecomputeConfig`)."""
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

    def __post_init__(self):
        check_choices(self)
        for name in ("batch_tokens", "chunk_rows", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise OptionError(self, (name,), f"{{}} must be positive (got {getattr(self, name)})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise OptionError(self, ("gpu_memory_utilization",),
                              f"{{}} must be in (0, 1] (got {self.gpu_memory_utilization})")
    # Not an option: precompute's --max_length, the longest sequence a backend is given (hf: whether a sliding
    # window can bind, `prefpipe.attention.window_binds`); None when unknown.
    max_length: int | None = None


class Backend:
    """A scoring engine. A backend sets `name` and implements `provenance`, `score` and, if it holds anything,
    `close`; `score_pairs` has a default (both responses through `score`) that a backend with a faster path for
    a shared prompt overrides (hf: the prompt runs once). Both score the exact ids they are given; neither may
    re-tokenize text. `progress`, when given, is called as `progress(sequences, tokens)` after each forward or
    engine call (the driver turns it into tokens/s on its bar)."""
    name = ""

    def __init__(self, options: BackendOptions):
        self.options = options

    @staticmethod
    def numerics(options: BackendOptions) -> tuple[str, str | None]:
        """(dtype, weight quantization or None) this backend will score in with `options`, decided without
        loading the engine: the plan (prefpipe.precompute.plan) builds the cache identity from it, and
        `provenance` must report the same."""
        raise NotImplementedError

    def provenance(self) -> dict:
        """What goes into the cache metadata's `backend` entry: at least name, version, dtype (and quantization
        when there is one), as `numerics` said."""
        raise NotImplementedError

    def score(self, prompts: list[list[int]], responses: list[list[int]], *, per_token: bool = False,
              progress=None) -> Scores:
        """`Scores` of each `responses[i]` after `prompts[i]`, in input order: float sums, int counts and, with
        `per_token`, each response's per-token log-probs (a list of floats) from the same forward as its sum."""
        raise NotImplementedError

    def score_pairs(self, prompts: list[list[int]], firsts: list[list[int]], seconds: list[list[int]], *,
                    per_token: bool = False, progress=None) -> Scores:
        """What `score(prompts + prompts, firsts + seconds)` returns."""
        return self.score(list(prompts) * 2, list(firsts) + list(seconds), per_token=per_token, progress=progress)

    def close(self) -> None:
        """Release the engine."""


# `--backend NAME` -> the class that implements it, as "module:Class" so that this module imports no backend (each
# backend imports this one) and an engine's heavy imports happen only when it is chosen. A new backend is one
# module plus one entry here.
BACKENDS = {
    "hf": "prefpipe.precompute.hf_backend:HFBackend",
    "vllm": "prefpipe.precompute.vllm_backend:VLLMBackend",
}


def backend_class(name: str) -> type[Backend]:
    import importlib

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, options: BackendOptions) -> Backend:
    return backend_class(name)(options)
