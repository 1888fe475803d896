"""The generator backends by name (`--backend` of `prefpipe generate`); each engine is imported only when chosen."""

from __future__ import annotations

from prefpipe.generation.sampler import Generator
from prefpipe.generation.vllm_sampler import VllmGenerator


def make_generator(backend: str, cfg, tokenizer) -> Generator:
    """The backend `backend` for a `GenerateConfig`; engines are imported only here (vLLM by VllmGenerator)."""
    if backend == "vllm":
        return VllmGenerator(cfg, tokenizer)
    from prefpipe.generation.hf_sampler import HfGenerator  # torch: only when hf is chosen
    return HfGenerator.load(cfg, tokenizer)
