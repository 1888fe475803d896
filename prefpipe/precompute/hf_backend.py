"""The transformers scoring backend (`--backend hf`, the default), a thin shell over `prefpipe.scoring`.

Decisions a user may want to know:

- Sequences are sorted by length (longest first) and packed into batches of at most `--batch_tokens` padded
  tokens, so padding waste stays small on skewed data; results come back in input order. A sequence longer than
  the budget is scored alone.
- Only response positions go through the LM head, in float32, in chunks sized from the vocabulary (about 128 MB
  of logits at a time), so memory does not grow with `batch x seq x vocab`.
- Scores do not depend on how rows were batched: right padding with an attention mask leaves every real
  token's position and context unchanged (tested against each row scored alone).
- **Prompt once** (`--prompt_once`, the default): the two responses of a row (chosen and rejected; for KTO the
  completion and its mismatched partner) follow one copy of the prompt, with position ids and block attention
  (`prefpipe.attention`) that keep them apart, so the prompt runs once per row (`prefpipe.scoring.score_pairs`);
  pairs are laid end to end without padding. Scores equal the separate forwards to float round-off. Models
  whose attention is not sdpa (eager, flash, flex, custom kernels), models with a sliding window shorter than
  `--max_length` (a longer one never binds), and models that fail a probe at start get a one-line warning and
  score each response in its own forward, as `--no_prompt_once` does. The cache's `backend.prompt_once` records
  which path scored it.
"""

from __future__ import annotations

import torch

from prefpipe.attention import install as install_block_attention
from prefpipe.modeling import load_model, resolve_device, resolve_dtype
from prefpipe.tokenizer import quiet_transformers
from prefpipe.precompute.backend import Backend, BackendOptions
from prefpipe.scores import Scores
from prefpipe.packing import prompt_once_supported
from prefpipe.scoring import head_chunk_tokens, score_pairs, score_sequences
from prefpipe.warn import warn


class HFBackend(Backend):
    name = "hf"

    def __init__(self, options: BackendOptions, model=None):
        super().__init__(options)
        quiet_transformers()
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormal floats slow CPU matmuls several-fold (tiny models, 5-7x)
        self.model = model if model is not None else load_model(options.model, self.dtype, self.device,
                                                                load_in_4bit=options.load_in_4bit)
        self.model.eval()
        install_block_attention(self.model)  # a model handed in directly; load_model has done it already
        self.chunk_tokens = head_chunk_tokens(self.model)
        self.prompt_once = options.prompt_once
        if self.prompt_once:
            why = prompt_once_supported(self.model, self.device, options.max_length)
            if why is not None:
                warn(f"--prompt_once: {why}; scoring each response in its own forward instead")
                self.prompt_once = False

    @staticmethod
    def numerics(options: BackendOptions) -> tuple[str, str | None]:
        dtype = resolve_dtype(options.dtype, resolve_device(options.device))
        return str(dtype).removeprefix("torch."), "nf4" if options.load_in_4bit else None

    def provenance(self) -> dict:
        import transformers
        # The device type, not the index: ranks on cuda:0 and cuda:1 produce one cache.
        return {"name": self.name, "version": transformers.__version__, "torch": torch.__version__,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type,
                "prompt_once": self.prompt_once,
                **({"quantization": "nf4"} if self.options.load_in_4bit else {})}

    def score(self, prompts: list[list[int]], responses: list[list[int]], *, per_token: bool = False,
              progress=None) -> Scores:
        scores = score_sequences(self.model, prompts, responses, batch_tokens=self.options.batch_tokens,
                                 chunk_tokens=self.chunk_tokens, per_token=per_token, progress=progress,
                                 device=self.device)
        return _as_lists(scores)

    def score_pairs(self, prompts: list[list[int]], firsts: list[list[int]], seconds: list[list[int]], *,
                    per_token: bool = False, progress=None) -> Scores:
        """Each prompt runs once when the model allows it (module docstring)."""
        if not self.prompt_once:
            return super().score_pairs(prompts, firsts, seconds, per_token=per_token, progress=progress)
        scores = score_pairs(self.model, prompts, firsts, seconds, batch_tokens=self.options.batch_tokens,
                             chunk_tokens=self.chunk_tokens, per_token=per_token, progress=progress,
                             device=self.device)
        return _as_lists(scores)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _as_lists(scores: Scores) -> Scores:
    """Per-token values as plain float lists, as every backend returns them."""
    return scores if scores.tokens is None else scores._replace(tokens=[t.tolist() for t in scores.tokens])
