"""The `vllm` generator: `SamplingParams(n=K)` over token-id prompts (`TokensPrompt`), so the engine samples from
exactly the prompt ids the cache will hold. The engine runs without its tokenizer (nothing is re-encoded), so it is
told the stop ids, as the hf generator is.

What holds for vLLM 0.32 (the CPU build, and the GPU releases of that line):

- The returned `token_ids` of a completion that stopped on a stop id end with that id (only the text leaves it
  out), so a "stop" completion ends with its stop token as the hf generator's do; a "length" one has exactly
  `max_new_tokens` ids and no stop id (the engine checks stop ids before the length).
- Greedy (`temperature` 0) refuses `n > 1`: one completion per prompt is decoded and repeated K times.
- `top_k` 0 is off (it is passed only when set, which older releases' -1 also accept).
- Seeds: request j of a call gets `seed + j * K`, and vLLM seeds its i-th child `+ i`, so every completion of a
  part has its own stream (the same seed for every prompt would draw the same random numbers for each).
- On CPU, prompts are prefilled whole (no chunked prefill): with chunks, vLLM rewinds seeded generators, which
  CPU generators cannot do, and sampling stops with "CPU Generator does not use offset".
- The engine is started by prefpipe.vllm_engine's rules: `--dtype auto` is float32 on CPU and bf16 on GPUs that
  support it (never the checkpoint's dtype), CPU engines run eagerly and in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefpipe.errors import UserError
from prefpipe.generation.sampler import Completion, Generator, stop_token_ids
from prefpipe.model_paths import resolve_model_dir
from prefpipe.vllm_engine import (context_limit, distribution, engine_dtype, engine_settings, import_vllm,
                                  refuse_adapter_dir, require_vllm, shutdown)

FLAG = "--backend vllm"


class VllmGenerator(Generator):
    name = "vllm"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg.sampling)
        refuse_adapter_dir(cfg.model, "sample", FLAG)
        require_vllm(FLAG)
        model_dir = str(resolve_model_dir(cfg.model))
        gen_cfg = Path(model_dir) / "generation_config.json"
        gen_eos = json.loads(gen_cfg.read_text()).get("eos_token_id") if gen_cfg.exists() else None
        self.stops = stop_token_ids(tokenizer, gen_eos)
        self.dtype, self.on_gpu = engine_dtype(cfg.dtype)
        limit = context_limit(model_dir)
        want = cfg.input.max_prompt_length + cfg.sampling.max_new_tokens  # prompts are cut to max_prompt_length
        max_model_len = min(limit, want) if limit else want
        engine_args = engine_settings(self.on_gpu)
        if not self.on_gpu:
            # vLLM rewinds a seeded request's generator when it throws away the token sampled after a partial
            # (chunked) prefill, and a CPU torch.Generator cannot rewind ("CPU Generator does not use offset"):
            # whole prefills only, in a step budget that holds the longest request.
            engine_args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))
        vllm = import_vllm(FLAG)  # after the environment defaults engine_settings set: vLLM reads them on import
        self.version, self.package = vllm.__version__, distribution()
        try:
            self.llm = vllm.LLM(model=model_dir, skip_tokenizer_init=True, dtype=self.dtype, seed=cfg.sampling.seed,
                                gpu_memory_utilization=cfg.gpu_memory_utilization, disable_log_stats=True,
                                max_model_len=max_model_len, **engine_args)
        except (ValueError, TypeError) as e:
            # vLLM reports bad settings (context too long, not enough GPU memory, unknown architecture) this way.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"vLLM could not start an engine for this model: {first}", file=model_dir)

    def provenance(self) -> dict:
        return {"name": self.name, "version": self.version, "package": self.package, "dtype": self.dtype,
                "device": "cuda" if self.on_gpu else "cpu", "stop_ids": sorted(self.stops)}

    def _params(self, seed: int, n_prompts: int) -> list:
        from vllm import SamplingParams

        s = self.sampling
        greedy = s.temperature == 0
        n = 1 if greedy else s.num_samples
        common = dict(n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                      stop_token_ids=sorted(self.stops), detokenize=False, **({"top_k": s.top_k} if s.top_k else {}))
        return [SamplingParams(seed=seed + j * n, **common) for j in range(n_prompts)]

    def _completion(self, o) -> Completion:
        ids = [int(t) for t in o.token_ids]
        if o.finish_reason == "stop":
            # A stop id the engine was told of ends the ids; older releases left it out (then it is stop_reason).
            if (not ids or ids[-1] not in self.stops) and isinstance(o.stop_reason, int):
                ids.append(o.stop_reason)
            if not ids or ids[-1] not in self.stops:
                raise RuntimeError(f"vLLM reported a stop without a stop id ({o.stop_reason!r})")
            return ids, "stop"
        if o.finish_reason == "length":
            return ids, "length"
        raise RuntimeError(f"vLLM ended a completion with finish reason {o.finish_reason!r}")

    def generate(self, prompt_ids: list[list[int]], seed: int, progress=None) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        k = self.sampling.num_samples
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_ids],
                                    self._params(seed, len(prompt_ids)), use_tqdm=False)
        out = []
        for p, r in zip(prompt_ids, results):
            if list(r.prompt_token_ids) != list(p):
                raise RuntimeError("vLLM sampled from other prompt ids than it was given")
            comps = sorted(r.outputs, key=lambda o: o.index)
            out.append([self._completion(comps[i % len(comps)]) for i in range(k)])
        if progress is not None:
            progress(len(prompt_ids))
        return out

    def close(self):
        llm, self.llm = getattr(self, "llm", None), None
        shutdown(llm)
