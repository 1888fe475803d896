"""The pipeline's own keys (those no phase command takes), declared once as settings dataclasses (prefpipe.options):
the top-level ones, `[train] kto_lr` and the `[eval]` targets. prefpipe.pipeline.config turns them into keys and
builds them, with every phase's settings, when it resolves a pipeline."""

from __future__ import annotations

from dataclasses import dataclass

from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.options import OptionError, opt, same_as
from prefpipe.train.config import TrainConfig


@dataclass(frozen=True)
class PipelineSettings:
    """The top-level keys: what to run, where, and the settings every phase shares."""
    model: str | None = opt(None, path=True, help="The SFT model directory (or hub id): reference and starting "
                            "policy.")
    data: str | None = opt(None, path=True, help="Preference data (a file, directory or glob).")
    kto_data: str | None = opt(None, path=True, help="Data for kto runs [default: --data, two examples per pair].")
    cache: str | None = opt(None, path=True, help="Paired cache directory [default: RUNS_DIR/cache-<identity>].")
    kto_cache: str | None = opt(None, path=True, help="KTO cache directory [default: RUNS_DIR/cache-kto-<identity>].")
    runs_dir: str = opt("runs", path=True, help="Where runs, evaluations, the summary and the plots go.")
    loss_type: tuple[str, ...] = same_as(TrainConfig, "loss_types", help="Loss types to train (a list; repeat the "
                                         "option).")
    beta: tuple[float, ...] = same_as(TrainConfig, "betas", help="Betas to sweep (a list; repeat the option).")
    kto_beta: tuple[float, ...] | None = opt(None, help="Betas for kto runs [default: --beta].")
    recompute: bool = opt(False, help="Recompute the caches even when they are valid.")
    dtype: str = same_as(TrainConfig, "dtype", help="Compute dtype for every phase.")
    device: str = same_as(TrainConfig, "device")
    progress: bool = same_as(TrainConfig, "progress", help="Progress bars.")
    chat_date: str = same_as(TokenizeSettings, "chat_date")
    rounds: int | None = opt(None, metavar="N", help="On-policy rounds: data holds prompts, and each round "
                             "generates from the current policy ([generate] keys), judges, builds pairs, "
                             "precomputes, trains and evaluates (RUNS_DIR/round-<r>/).",
                             default_text="unset: data holds pairs, no generation")
    reference_model: str = opt("initial", choices=("initial", "previous"), help="rounds: the reference of round r "
                               "is the SFT model (initial, as RLHFlow does) or round r's starting policy "
                               "(previous, as Iterative RPO does).")


@dataclass(frozen=True)
class PipelineTrain:
    """`[train]` keys of the pipeline only."""
    kto_lr: float | None = opt(None, help="Peak learning rate of kto runs [default: lr].")

    def __post_init__(self):
        if self.kto_lr is not None and not self.kto_lr > 0:  # 0 must not fall back to lr, nor nan pass
            raise OptionError(self, ("kto_lr",), f"{{}} must be positive (got {self.kto_lr:g})")


@dataclass(frozen=True)
class PipelineEval:
    """`[eval]` keys of the pipeline only (besides GenSettings'); their full names start with `eval_`."""
    data: str | None = opt(None, path=True, help="Held-out preference pairs: implicit-reward accuracy and margin.")
    cache: str | None = opt(None, path=True, help="Cache for eval_data [default: RUNS_DIR/cache-eval-<identity>].")
    gen: str | None = opt(None, path=True, help="Held-out GSM8K-style questions: greedy exact-match accuracy.")
    baseline: bool = opt(True, help="Also evaluate the SFT model itself (RUNS_DIR/reference).")
