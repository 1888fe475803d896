"""Batched generation for evaluation (greedy) and for the demo's on-policy samples.

Prompts are tokenized by the cache's rule (text without special tokens, then the tokenizer's BOS prefix once; see
prefpipe.data.tokenize), so the model generates from exactly the ids it was trained and scored on. Batches are
left-padded, which `generate` handles with the attention mask; rows are sorted by length first so that a batch
carries little padding, and results come back in input order.

Engines: ``hf`` is transformers' `generate`. ``vllm`` is used when vLLM is importable and a CUDA device is present
(``--engine auto``), or when asked for; on CPU it is no faster than batched transformers, so `auto` keeps ``hf``
there.
"""

from __future__ import annotations

import torch

from prefpipe.data.tokenize import PairTokenizer
from prefpipe.errors import UserError
from prefpipe.generation.config import SamplingSettings
from prefpipe.generation.hf_sampler import HfGenerator
from prefpipe.vllm_engine import engine_dtype, engine_settings


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return PairTokenizer(tokenizer).encode_prompts(prompts)


def hf_generate(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, batch_size: int = 64,
                num_samples: int = 1, temperature: float = 0.0, seed: int = 0, progress=None) -> list[list[str]]:
    """Generations for each prompt: `num_samples` of them, greedy when `temperature` is 0, each ending at the
    tokenizer's EOS; `prefpipe generate`'s hf sampler (prefpipe.generation.hf_sampler) does the work.

    Returns one list of `num_samples` strings per prompt, special tokens removed, in input order.
    """
    sampling = SamplingSettings(num_samples=num_samples, temperature=temperature, max_new_tokens=max_new_tokens,
                                seed=seed)
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gens = HfGenerator(model, tokenizer, sampling, batch_size, stops=stops).generate(prompt_ids, seed, progress)
    return [[tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in comps] for comps in gens]


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def vllm_generate(model_path: str, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int,
                  dtype: str = "auto", gpu_memory_utilization: float = 0.85) -> list[list[str]]:
    """Greedy generation with vLLM from the exact prompt ids; decoded here with the same tokenizer as `hf`."""
    import json
    from pathlib import Path

    dtype, on_gpu = engine_dtype(dtype)  # auto: float32 on CPU, whatever the checkpoint's dtype
    engine_args = engine_settings(on_gpu)  # before vLLM is imported: it reads the environment then
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    limit = json.loads((Path(model_path) / "config.json").read_text()).get("max_position_embeddings", 4096)
    llm = LLM(model=model_path, skip_tokenizer_init=True, dtype=dtype, enable_prefix_caching=False, seed=0,
              gpu_memory_utilization=gpu_memory_utilization, disable_log_stats=True,
              max_model_len=min(limit, max(len(p) for p in prompt_ids) + max_new_tokens), **engine_args)
    # Without its tokenizer the engine does not know EOS: name it, as transformers' generate() is told it.
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False,
                            stop_token_ids=[tokenizer.eos_token_id])
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
    return [[tokenizer.decode(list(r.outputs[0].token_ids), skip_special_tokens=True)] for r in results]


def pick_engine(engine: str) -> str:
    if engine == "auto":
        return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"
    if engine == "vllm" and not vllm_available():
        raise UserError("--engine vllm was asked for, but vLLM is not importable here "
                        "(pip install 'prefpipe[vllm]' on CUDA machines)")
    if engine not in ("hf", "vllm"):
        raise UserError(f"unknown engine {engine!r}; choose auto, hf or vllm")
    return engine
