"""The `hf` generator: transformers' `generate` (KV cache, so no step re-encodes the prefix) over batches of
prompts of similar length, left-padded, `num_samples` sequences per prompt in one call."""

from __future__ import annotations

import torch

from prefpipe.generation.config import SamplingSettings
from prefpipe.generation.sampler import Completion, Generator, cut_at_stop, stop_token_ids
from prefpipe.logprobs import pad_batch
from prefpipe.modeling import load_model, resolve_device, resolve_dtype


class HfGenerator(Generator):
    name = "hf"

    def __init__(self, model, tokenizer, sampling: SamplingSettings, batch_size: int, stops: set[int] | None = None):
        """A loaded causal LM; `stops`: the ids that end a completion (default: `stop_token_ids`)."""
        super().__init__(sampling)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.batch_size = batch_size
        self.stops = stops if stops is not None else \
            stop_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.stops) if self.stops else 0

    @classmethod
    def load(cls, cfg, tokenizer) -> HfGenerator:
        """The model of a `GenerateConfig`, loaded on its device and dtype."""
        device = resolve_device(cfg.device)
        return cls(load_model(cfg.model, resolve_dtype(cfg.dtype, device), device), tokenizer, cfg.sampling,
                   cfg.batch_size)

    def provenance(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type,
                "stop_ids": sorted(self.stops)}

    def _config(self, k: int):
        """A generation config of prefpipe's settings alone: a model's own generation_config.json (Qwen's
        repetition_penalty, top_k and temperature, say) would otherwise change the distribution sampled, which then
        is no longer the model's, and would differ from the vLLM backend, which applies only what it is given."""
        from transformers import GenerationConfig

        s = self.sampling
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k} \
            if s.temperature > 0 else {"do_sample": False}
        return GenerationConfig(max_new_tokens=s.max_new_tokens, num_return_sequences=k, pad_token_id=self.pad,
                                eos_token_id=sorted(self.stops), **sampling)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], seed: int, progress=None) -> list[list[Completion]]:
        n_new = self.sampling.max_new_tokens
        # Greedy decoding gives every sample of a prompt the same completion: decode once, copy (transformers
        # refuses num_return_sequences > 1 without sampling).
        k = self.sampling.num_samples if self.sampling.temperature > 0 else 1
        copies = self.sampling.num_samples // k
        order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
        out: list = [None] * len(prompt_ids)
        torch.manual_seed(seed)  # one stream per call: a part is drawn the same whether or not it was resumed
        per_batch = max(1, self.batch_size // k)
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            ids, mask = pad_batch([prompt_ids[i] for i in idx], self.pad, self.device, side="left")
            gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self._config(k))
            new = gen[:, ids.shape[1]:].tolist()
            for j, i in enumerate(idx):
                out[i] = [cut_at_stop(new[j * k + s], self.stops, n_new) for s in range(k)] * copies
            if progress is not None:
                progress(len(idx))
        return out

    def close(self):
        del self.model
