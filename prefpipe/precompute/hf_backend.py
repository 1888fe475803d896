"""The transformers scoring backend (`--backend hf`, the default), a thin shell over `prefpipe.scoring`.

Decisions a user may want to know:

- Sequences are sorted by length (longest first) and packed into batches of at most `--batch_tokens` padded
  tokens, so padding waste stays small on skewed data; results come back in input order. A sequence longer than
  the budget is scored alone.
- Only response positions go through the LM head, in float32, in chunks sized from the vocabulary (about 128 MB
  of logits at a time), so memory does not grow with `batch x seq x vocab`.
- Scores do not depend on how rows were batched: right padding with an attention mask leaves every real
  token's position and context unchanged (tested against each row scored alone).
"""

from __future__ import annotations

import torch

from prefpipe.modeling import load_model, quiet_transformers, resolve_device, resolve_dtype
from prefpipe.precompute.backend import BackendOptions
from prefpipe.scoring import head_chunk_tokens, score_sequences


class HFBackend:
    name = "hf"

    def __init__(self, options: BackendOptions, model=None):
        quiet_transformers()
        self.options = options
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        if options.batch_tokens < 1:
            from prefpipe.errors import UserError
            raise UserError(f"--batch_tokens must be positive (got {options.batch_tokens})")
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal floats slow CPU matmuls several-fold (tiny models, 5-7x)
        self.model = model if model is not None else load_model(options.model, self.dtype, self.device)
        self.model.eval()
        self.chunk_tokens = head_chunk_tokens(self.model)
        self.progress = None  # optional callable(sequences, tokens), called after each forward

    def set_progress(self, callback):
        self.progress = callback

    def provenance(self) -> dict:
        import transformers
        # The device type, not the index: ranks on cuda:0 and cuda:1 produce one cache.
        return {"name": self.name, "version": transformers.__version__, "torch": torch.__version__,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type}

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[list[float], list[int]]:
        scores = score_sequences(self.model, prompts, responses, batch_tokens=self.options.batch_tokens,
                                 chunk_tokens=self.chunk_tokens, progress=self.progress, device=self.device)
        return scores.sums, scores.counts

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
