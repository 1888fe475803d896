"""The `vllm` generator: `SamplingParams(n=K)` over token-id prompts (`TokensPrompt`), so the engine samples from
exactly the prompt ids the cache will hold. The engine runs without its tokenizer (nothing is re-encoded), so it is
told the stop ids, as the hf generator is."""

from __future__ import annotations

import json
from pathlib import Path

from prefpipe.generation.sampler import Completion, Generator, stop_token_ids
from prefpipe.model_paths import resolve_model_dir


class VllmGenerator(Generator):
    name = "vllm"

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg.sampling)
        from vllm import LLM

        model_dir = resolve_model_dir(cfg.model)
        config = json.loads((Path(model_dir) / "config.json").read_text())
        gen_cfg = Path(model_dir) / "generation_config.json"
        gen_eos = json.loads(gen_cfg.read_text()).get("eos_token_id") if gen_cfg.exists() else None
        self.stops = stop_token_ids(tokenizer, gen_eos)
        limit = config.get("max_position_embeddings", 4096)
        want = cfg.input.max_prompt_length + cfg.sampling.max_new_tokens
        self.llm = LLM(model=str(model_dir), skip_tokenizer_init=True, dtype=cfg.dtype, seed=cfg.sampling.seed,
                       gpu_memory_utilization=cfg.gpu_memory_utilization, disable_log_stats=True,
                       max_model_len=min(limit, want))
        self.dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def provenance(self) -> dict:
        import vllm
        return {"name": self.name, "version": vllm.__version__, "dtype": self.dtype, "stop_ids": sorted(self.stops)}

    def generate(self, prompt_ids: list[list[int]], seed: int, progress=None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        s = self.sampling
        params = SamplingParams(n=s.num_samples, temperature=s.temperature, top_p=s.top_p,
                                **({"top_k": s.top_k} if s.top_k else {}), max_tokens=s.max_new_tokens,
                                seed=seed, stop_token_ids=sorted(self.stops), detokenize=False)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        out = []
        for r in results:
            comps = []
            for o in r.outputs:
                ids = list(o.token_ids)
                finish = "stop" if o.finish_reason == "stop" else "length"
                # The engine stopped on a stop id it was told of: that token was produced, keep it as hf does.
                if finish == "stop" and (not ids or ids[-1] not in self.stops) and isinstance(o.stop_reason, int):
                    ids.append(o.stop_reason)
                comps.append((ids, finish))
            out.append(comps)
        if progress is not None:
            progress(len(prompt_ids))
        return out

    def close(self):
        del self.llm
