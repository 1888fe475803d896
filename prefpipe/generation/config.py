"""`GenerateConfig`: every option of `prefpipe generate`, declared once (see prefpipe.options)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prefpipe.data.settings import InputSettings
from prefpipe.options import DTYPES, OptionError, check_choices, group, opt, same_as
from prefpipe.precompute.config import PrecomputeConfig

GENERATE_BACKENDS = ("hf", "vllm")
PAIR_RULES = ("auto", "correct_vs_incorrect", "best_vs_worst")


@dataclass(frozen=True)
class SamplingSettings:
    """How each prompt is sampled. `temperature` 0 is greedy (then every sample of a prompt is the same)."""
    num_samples: int = opt(8, metavar="K", help="Completions sampled per prompt.")
    temperature: float = opt(1.0, help="Sampling temperature (0: greedy).")
    top_p: float = opt(1.0, help="Nucleus sampling: keep the smallest set of tokens with this much probability "
                       "(1: off).")
    top_k: int = opt(0, help="Keep only the K most probable tokens (0: off).")
    max_new_tokens: int = opt(256, help="Longest completion; a completion cut here is marked finish_reason "
                              "'length' and gets no EOS it did not produce.")
    seed: int = opt(0, help="Sampling seed (each part is seeded from it and its index, so a resumed run draws "
                    "what an uninterrupted one would).")

    def __post_init__(self):
        if self.num_samples < 1:
            raise OptionError(self, ("num_samples",), f"{{}} must be positive (got {self.num_samples})")
        if self.max_new_tokens < 1:
            raise OptionError(self, ("max_new_tokens",), f"{{}} must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise OptionError(self, ("temperature",), f"{{}} must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise OptionError(self, ("top_p",), f"{{}} must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise OptionError(self, ("top_k",), f"{{}} must be >= 0 (got {self.top_k})")


@dataclass(frozen=True)
class JudgeSettings:
    """How samples are scored and paired (docs/generate.md)."""
    reward: str = opt("answer", metavar="JUDGE", help="answer: the final answer against --gold_col (1 or 0); "
                      "model: the reward model --reward_model; python:MODULE:FUNCTION: FUNCTION(prompt, "
                      "completion, row) from the working directory, returning a number or a bool.")
    gold_col: str = opt("answer", help="answer: the column holding the gold answer (GSM8K's '#### N' or a number).")
    reward_model: str | None = opt(None, path=True, help="model: an AutoModelForSequenceClassification directory "
                                   "with one output (its own tokenizer and chat template).")
    reward_batch_size: int = opt(16, help="model: completions per reward-model forward.")
    pairs: str = opt("auto", choices=PAIR_RULES, help="auto: correct_vs_incorrect for 0/1 rewards, best_vs_worst "
                     "for real-valued ones.")
    pairs_per_prompt: int = opt(2, help="Most pairs built from one prompt's samples.")
    min_margin: float = opt(0.0, help="best_vs_worst: the least reward difference a pair needs.")
    kto_threshold: float = opt(0.0, help="KTO view of real-valued rewards: desirable when above this "
                               "(0/1 rewards: desirable when correct).")

    def __post_init__(self):
        check_choices(self)
        r = self.reward
        if r not in ("answer", "model") and not (r.startswith("python:") and r.count(":") == 2 and all(r.split(":"))):
            raise OptionError(self, ("reward",), f"{{}} must be answer, model or python:MODULE:FUNCTION (got {r!r})")
        if r == "model" and not self.reward_model:
            raise OptionError(self, ("reward", "reward_model"), "{} model needs {}")
        if self.reward_model and r != "model":
            raise OptionError(self, ("reward_model", "reward"), "{} is read only with {} model")
        for name in ("pairs_per_prompt", "reward_batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(self, (name,), f"{{}} must be positive (got {getattr(self, name)})")
        if self.min_margin < 0:
            raise OptionError(self, ("min_margin",), f"{{}} must be >= 0 (got {self.min_margin})")


@dataclass(frozen=True)
class GenerateConfig:
    """Maps one-to-one to `prefpipe generate` options: its own, the sampling's, the judge's and the input
    settings (the prompt column, chat date and `max_prompt_length`, by which prompts are cut exactly as the cache
    will cut them)."""
    model: str = opt(help="Model to sample from (the SFT model, or a round's policy).", path=True)
    data: str = opt(help="Prompts: a file, a directory, a glob or a Hugging Face dataset; other columns (a gold "
                    "answer, tests) are passed to the judge.", path=True)
    out: str = opt(help="Output directory: samples, pairs, the KTO view and a manifest; itself a dataset "
                   "(`prefpipe precompute --data OUT`).", path=True)
    sampling: SamplingSettings = group(SamplingSettings)
    judge: JudgeSettings = group(JudgeSettings)
    backend: str = opt("hf", choices=GENERATE_BACKENDS, help="hf: transformers' generate with a KV cache; vllm: "
                       "SamplingParams(n=K) from token-id prompts.")
    dtype: str = opt("auto", choices=DTYPES, help="auto: bf16 on GPUs that support it, float32 on CPU.")
    device: str = opt("auto", help="hf: auto, cpu, cuda or cuda:N.")
    batch_size: int = opt(64, help="hf: sequences (prompts x samples) per generate call.")
    gpu_memory_utilization: float = opt(0.85, help="vllm: fraction of GPU memory the engine may take.")
    input: InputSettings = group(InputSettings)
    drop_truncated: bool = opt(False, help="Drop completions cut by --max_new_tokens (counted) instead of keeping "
                               "them marked 'length'.")
    part_rows: int = opt(256, help="Prompts per part (the unit of resume).")
    engine: str = opt("local", choices=("local", "ray"), help="local: sample in this process; ray: on a pool of "
                      "--ray_workers Ray actors, one model and judge each (docs/ray.md).")
    ray_workers: int = opt(1, metavar="N", help="ray: sampling actors (GPUs per actor: 1, none with --device cpu "
                           "or a GPU-less cluster).")
    ray_address: str | None = same_as(PrecomputeConfig, "ray_address")
    overwrite: bool = opt(False, help="Delete the parts already in --out first (needed when they come from a "
                          "different run).")
    progress: bool = same_as(PrecomputeConfig, "progress")

    OPTION_ORDER: ClassVar[tuple] = (
        "model", "data", "out", "num_samples", "temperature", "top_p", "top_k", "max_new_tokens", "seed",
        "reward", "gold_col", "reward_model", "pairs", "pairs_per_prompt", "min_margin", "kto_threshold",
        "drop_truncated", "backend", "dtype", "device", "batch_size", "gpu_memory_utilization", "reward_batch_size",
        "max_length", "max_prompt_length", "chat_date", "data_split", "data_config", "prompt_col", "system_col",
        "part_rows", "engine", "ray_workers", "ray_address", "overwrite", "progress")

    def __post_init__(self):
        check_choices(self)
        for name in ("batch_size", "part_rows", "ray_workers"):
            if getattr(self, name) < 1:
                raise OptionError(self, (name,), f"{{}} must be positive (got {getattr(self, name)})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise OptionError(self, ("gpu_memory_utilization",),
                              f"{{}} must be in (0, 1] (got {self.gpu_memory_utilization})")
        if self.sampling.num_samples < 2:
            raise OptionError(self.sampling, ("num_samples",), f"{{}} must be at least 2: a pair needs two "
                              f"samples of one prompt (got {self.sampling.num_samples})")
