"""The generator backends by name (`--backend` of `prefpipe generate`); each engine is imported only when chosen."""

from __future__ import annotations

from prefpipe.generation.sampler import Generator


def make_generator(backend: str, cfg, tokenizer) -> Generator:
    """The backend `backend` for a `GenerateConfig`; engines are imported only here."""
    if backend == "vllm":
        from prefpipe.generation.vllm_sampler import VllmGenerator
        return VllmGenerator(cfg, tokenizer)
    from prefpipe.generation.hf_sampler import HfGenerator
    return HfGenerator.load(cfg, tokenizer)
