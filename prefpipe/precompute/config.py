"""`PrecomputeConfig`: every option of `prefpipe precompute`, declared once (see prefpipe.options)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from prefpipe.data.settings import InputSettings
from prefpipe.options import OptionError, check_choices, group, opt
from prefpipe.precompute.backend import BACKENDS, BackendOptions


@dataclass(frozen=True)
class PrecomputeConfig:
    """Maps one-to-one to `prefpipe precompute` options: its own, the engine's (`backend_options`, what the
    backend is built with) and the input settings (`input`). The engine's `max_length` is the input's, and its
    `max_model_len` defaults to it (both resolved on construction)."""
    data: str = opt(help="Preference data: a file, a directory or a glob.", path=True)
    out: str = opt(help="Cache directory to write (parts + manifest.json).", path=True)
    backend_options: BackendOptions = group(BackendOptions, required=True)
    backend: str = opt("hf", choices=tuple(BACKENDS), help="Scoring engine.")
    input: InputSettings = group(InputSettings)
    kto: bool = opt(False, help="Write a KTO cache from paired data (two examples per pair). Unpaired data (a "
                    "label column) always gives a KTO cache.")
    no_reference: bool = opt(False, help="Tokenize only, no scoring (an ORPO cache).")
    per_token: bool = opt(False, help="Also store each response's per-token reference log-probs "
                          "(ref_*_tokens, list<float32>), which LD-DPO (--ld_alpha) needs and the drift check "
                          "uses to name the worst token. Float32 values barely compress: about 5.5 bytes per response "
                          "token on disk (2,000 pairs of the tiny test model: 0.21 MB without, 1.34 MB with; "
                          "docs/per_token.md).")
    part_rows: int = opt(4096, help="Input rows per cache part (the unit of resume and sharding).")
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

    # `-h` and the pipeline's [precompute] keys list the options in this order (groups interleaved).
    OPTION_ORDER: ClassVar[tuple] = (
        "model", "data", "out", "backend", "dtype", "device", "max_length", "max_prompt_length", "chat_date",
        "batch_tokens", "prompt_once", "load_in_4bit", "kto", "no_reference", "per_token", "part_rows",
        "data_split", "data_config", "prompt_col", "chosen_col", "rejected_col", "completion_col", "label_col", "system_col",
        "turn_marker", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "chunk_rows", "shard",
        "verify", "overwrite", "progress")

    def __post_init__(self):
        check_choices(self)
        if self.part_rows < 1:
            raise OptionError(self, ("part_rows",), f"{{}} must be positive (got {self.part_rows})")
        if self.per_token and self.no_reference:
            raise OptionError(self, ("per_token", "no_reference"), "{} stores reference log-probs, which {} "
                              "leaves out")
        if self.ray_workers < 1:
            raise OptionError(self, ("ray_workers",), f"{{}} must be positive (got {self.ray_workers})")
        if self.verify < 0:
            raise OptionError(self, ("verify",), f"{{}} must be >= 0 (got {self.verify})")
        if self.backend_options.load_in_4bit and self.backend == "vllm":
            raise OptionError(self, ("load_in_4bit", "backend"), "{} quantizes the transformers model of {} hf; "
                              "vLLM has its own quantization settings, which prefpipe does not pass through")
        e = self.backend_options
        object.__setattr__(self, "backend_options", replace(
            e, max_length=self.input.max_length, max_model_len=e.max_model_len or self.input.max_length))

    @property
    def model(self) -> str:
        """The reference model (`--model`, an engine option)."""
        return self.backend_options.model
