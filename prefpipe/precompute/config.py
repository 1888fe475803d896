"""`PrecomputeConfig`: every option of `prefpipe precompute`, declared once (see prefpipe.options)."""

from __future__ import annotations

from dataclasses import dataclass

from prefpipe.data.formats import Columns
from prefpipe.data.settings import CheckSettings
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.options import OptionError, check_choices, group, opt, same_as
from prefpipe.precompute.backend import BACKENDS, BackendOptions


@dataclass(frozen=True)
class PrecomputeConfig:
    """Maps one-to-one to `prefpipe precompute` options. `max_prompt_length` is resolved to an integer on
    construction (None: half of `max_length`)."""
    model: str = same_as(BackendOptions, "model")
    data: str = opt(help="Preference data: a file, a directory or a glob.", path=True)
    out: str = opt(help="Cache directory to write (parts + manifest.json).", path=True)
    backend: str = opt("hf", choices=tuple(BACKENDS), help="Scoring engine.")
    dtype: str = same_as(BackendOptions, "dtype")
    device: str = same_as(BackendOptions, "device")
    max_length: int = same_as(TokenizeSettings, "max_length")
    max_prompt_length: int | None = same_as(TokenizeSettings, "max_prompt_length")
    chat_date: str = same_as(TokenizeSettings, "chat_date")
    batch_tokens: int = same_as(BackendOptions, "batch_tokens")
    prompt_once: bool = same_as(BackendOptions, "prompt_once")
    load_in_4bit: bool = same_as(BackendOptions, "load_in_4bit")
    kto: bool = opt(False, help="Write a KTO cache from paired data (two examples per pair). Unpaired data (a "
                    "label column) always gives a KTO cache.")
    no_reference: bool = opt(False, help="Tokenize only, no scoring (an ORPO cache).")
    per_token: bool = opt(False, help="Also store each response's per-token reference log-probs "
                          "(ref_*_tokens, list<float32>), which LD-DPO (--ld_alpha) needs and the drift check "
                          "uses to name the worst token. Float32 values barely compress: about 5.5 bytes per response "
                          "token on disk (2,000 pairs of the tiny test model: 0.21 MB without, 1.34 MB with; "
                          "docs/per_token.md).")
    part_rows: int = opt(4096, help="Input rows per cache part (the unit of resume and sharding).")
    data_split: str = same_as(CheckSettings, "data_split")
    data_config: str | None = same_as(CheckSettings, "data_config")
    columns: Columns = group(Columns)
    turn_marker: str = same_as(CheckSettings, "turn_marker")
    tensor_parallel_size: int = same_as(BackendOptions, "tensor_parallel_size")
    gpu_memory_utilization: float = same_as(BackendOptions, "gpu_memory_utilization")
    max_model_len: int | None = same_as(BackendOptions, "max_model_len")
    chunk_rows: int = same_as(BackendOptions, "chunk_rows")
    shard: str | None = opt(None, metavar="I/N", help="Independent process I of N: score only parts with index "
                            "% N == I. The process that finds every part present writes the manifest.")
    engine: str = opt("local", choices=("local", "ray"), help="local: score in this process (or its torchrun "
                      "ranks / --shard); ray: on a pool of --ray_workers Ray actors, one model each (docs/ray.md).")
    ray_workers: int = opt(1, metavar="N", help="ray: scoring actors (each loads the model once; GPUs per actor: "
                           "1 for hf, --tensor_parallel_size for vllm, none with --device cpu or a GPU-less "
                           "cluster).")
    ray_address: str | None = opt(None, metavar="ADDRESS", help="ray: join this cluster (auto: the one this node "
                                  "belongs to); --out must then be an absolute path every node sees.",
                                  default_text="start a local Ray instance for this command")
    verify: int = opt(0, metavar="K",
                      help="After writing, rescore K random rows with a plain transformers forward and compare.")
    overwrite: bool = opt(False, help="Delete the cache parts and manifest already in --out first (needed when "
                          "they come from a different run).")
    progress: bool = opt(True, help="Progress bar.", off_help="No progress bar.")

    def __post_init__(self):
        check_choices(self)
        object.__setattr__(self, "max_prompt_length", self.settings().max_prompt_length)
        if self.part_rows < 1:
            raise OptionError(self, ("part_rows",), f"{{}} must be positive (got {self.part_rows})")
        if self.per_token and self.no_reference:
            raise OptionError(self, ("per_token", "no_reference"), "{} stores reference log-probs, which {} "
                              "leaves out")
        if self.ray_workers < 1:
            raise OptionError(self, ("ray_workers",), f"{{}} must be positive (got {self.ray_workers})")
        if self.verify < 0:
            raise OptionError(self, ("verify",), f"{{}} must be >= 0 (got {self.verify})")
        if self.load_in_4bit and self.backend == "vllm":
            raise OptionError(self, ("load_in_4bit", "backend"), "{} quantizes the transformers model of {} hf; "
                              "vLLM has its own quantization settings, which prefpipe does not pass through")
        self.backend_options()  # the engine's own checks, now rather than when the engine starts

    def settings(self) -> TokenizeSettings:
        return TokenizeSettings(self.max_length, self.max_prompt_length, self.chat_date)

    def backend_options(self, device: str | None = None) -> BackendOptions:
        return BackendOptions(model=self.model, dtype=self.dtype, device=device or self.device,
                              batch_tokens=self.batch_tokens, prompt_once=self.prompt_once,
                              load_in_4bit=self.load_in_4bit,
                              tensor_parallel_size=self.tensor_parallel_size,
                              gpu_memory_utilization=self.gpu_memory_utilization,
                              max_model_len=self.max_model_len or self.max_length, chunk_rows=self.chunk_rows,
                              max_length=self.max_length)
