"""The transformers scoring backend (`--backend hf`, the default).

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

from prefpipe.logprobs import pad_batch, sequence_logprobs
from prefpipe.modeling import load_model, quiet_transformers, resolve_device, resolve_dtype
from prefpipe.precompute.backend import BackendOptions

# Float32 logits materialised per LM-head chunk; 32 Mi values = 128 MB, whatever the vocabulary.
LOGIT_BUDGET = 32 * 2 ** 20


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each group padded to its first (longest) member within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, cur, width = [], [], 0
    for i in order:
        if cur and (len(cur) + 1) * width > batch_tokens:
            batches.append(cur)
            cur = []
        if not cur:
            width = lengths[i]
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


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
            torch.set_flush_denormal(True)  # denormal floats slow CPU matmuls several-fold (REFERENCE 9)
        self.model = model if model is not None else load_model(options.model, self.dtype, self.device)
        self.model.eval()
        vocab = self.model.get_output_embeddings().weight.shape[0]
        self.chunk_tokens = max(16, LOGIT_BUDGET // vocab)
        self.progress = None  # optional callable(sequences, tokens), called after each forward

    def set_progress(self, callback):
        self.progress = callback

    def provenance(self) -> dict:
        import transformers
        # The device type, not the index: ranks on cuda:0 and cuda:1 produce one cache.
        return {"name": self.name, "version": transformers.__version__, "torch": torch.__version__,
                "dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type}

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[list[float], list[int]]:
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        sums: list[float] = [0.0] * len(seqs)
        counts: list[int] = [0] * len(seqs)
        if not seqs:
            return sums, counts
        with torch.inference_mode():
            for batch in length_batches([len(s) for s in seqs], self.options.batch_tokens):
                ids, mask = pad_batch([seqs[i] for i in batch], pad_id=0, device=self.device)
                plens = torch.tensor([len(prompts[i]) for i in batch], dtype=torch.long, device=self.device)
                s, c = sequence_logprobs(self.model, ids, mask, plens, chunk_tokens=self.chunk_tokens)
                for i, sv, cv in zip(batch, s.tolist(), c.tolist()):
                    sums[i], counts[i] = sv, cv
                if self.progress is not None:
                    self.progress(len(batch), int(mask.sum()))
        return sums, counts

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
