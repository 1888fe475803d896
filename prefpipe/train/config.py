"""Training settings: small dataclasses, each mapping one-to-one to a group of `prefpipe train` options."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, replace

from prefpipe.data.settings import InputSettings
from prefpipe.options import DTYPES, OptionError, check_choices, group, opt
from prefpipe.train.registry import (KNOBS, LOSS_TYPES, LOSSES, PAIRS, Knob, LossSpec, entry_for, resolve_loss_type,
                                       run_label, unread_knobs)
from prefpipe.train.schedule import SCHEDULERS
from prefpipe.train.tracking import REPORT_TO_CHOICES, check_installed, parse_report_to

REFERENCES = ("cached", "live")


class _LossMethods:
    """What `LossConfig` (generated below from the registry's knobs) does besides holding values."""

    def __post_init__(self):
        check_choices(self)
        object.__setattr__(self, "loss_type", canonical_loss_type(self, "loss_type", self.loss_type))
        if not self.beta > 0:
            raise OptionError(self, ("beta",), f"{{}} must be positive (got {self.beta})")
        for knob in KNOBS.values():
            v = getattr(self, knob.name)
            if v is None or v == knob.default:
                continue
            if knob.kind is float and not knob.valid(v):
                raise OptionError(self, (knob.name,), f"{{}} must be {knob.rule} (got {v:g})")
            if knob.needs and getattr(self, knob.needs[0]) != knob.needs[1]:
                raise OptionError(self, (knob.name, knob.needs[0]), f"{{}} needs {{}} {knob.needs[1]}")
        if self.wpo and LOSSES[self.loss_type].batch != PAIRS:
            raise OptionError(self, ("wpo",), f"{{}} weights pairs whose two responses are forwarded; "
                              f"{self.loss_type} does not forward them")
        # The entry this run trains, resolved once (a knob may select a variant: dpo + ld_alpha is ld_dpo).
        object.__setattr__(self, "_spec", entry_for(self.loss_type, self.knobs()))

    def knobs(self) -> dict:
        return {name: getattr(self, name) for name in KNOBS}

    @property
    def spec(self) -> LossSpec:
        return self._spec

    @property
    def needs_reference(self) -> bool:
        return self.spec.needs_reference

    @property
    def needs_per_token_reference(self) -> bool:
        return self.spec.needs_per_token_reference

    @property
    def run_name(self) -> str:
        """The run's directory under `--out`: `<loss>-beta<beta>`, or just `<loss>` for a loss without beta. A
        combination's `<loss>` is its canonical name without `*` (`0.8dpo+0.2bco_pair+1sft-beta0.1`); a run that
        trains LD-DPO ends in `-ld<alpha>`, one with WPO weights in `-wpo`."""
        label = run_label(self.loss_type)
        name = f"{label}-beta{self.beta:g}" if LOSSES[self.loss_type].uses_beta else label
        ld = f"-ld{self.ld_alpha:g}" if self.spec.needs_per_token_reference else ""
        return name + ld + ("-wpo" if self.wpo else "")


def _knob_field(k: Knob):
    kind = k.kind | None if k.default is None else k.kind
    return k.name, kind, opt(k.default, help=k.help, choices=k.choices, metavar=k.metavar,
                             default_text=k.default_text)


# One run's objective: `--loss_type`, one `--beta`, every loss's knobs (declared with their losses in
# `registry.KNOBS`; a knob none of the call's losses reads is refused by TrainConfig) and `--wpo`.
LossConfig = dataclasses.make_dataclass("LossConfig", [
    ("loss_type", str, opt("dpo", option=False)),  # set per run from TrainConfig.loss_types; canonical after init
    ("beta", float, opt(0.1, option=False)),  # set per run from TrainConfig.betas
    *(_knob_field(k) for k in KNOBS.values()),
    ("wpo", bool, opt(False, help="Weight each pair's loss by the policy's WPO weights w_c * w_r (paired losses "
                      "that forward both responses); the run is named <...>-wpo.")),
], bases=(_LossMethods,), frozen=True)
LossConfig.__module__ = __name__  # so that it pickles (torchrun, DataLoader workers) and reads as ours


_LOSS_HELP = ("One of " + ", ".join(LOSS_TYPES) + " (sigmoid: dpo), or a weighted sum in one value such as "
              "0.8*sigmoid+0.2*bco_pair+1*sft. Repeat to run several losses one after another.")


def canonical_loss_type(owner, field_name: str, text: str) -> str:
    """`text` resolved by `registry.resolve_loss_type`, or an OptionError naming the option."""
    try:
        return resolve_loss_type(text)
    except ValueError as e:
        raise OptionError(owner, (field_name,), "{} must be one of " + ", ".join(LOSS_TYPES) + " or a weighted "
                          f"sum such as 0.8*sigmoid+0.2*bco_pair+1*sft: {e} (got {text!r})") from None


@dataclass(frozen=True)
class OptimConfig:
    """`--lr`, `--weight_decay`, `--warmup_ratio`, `--lr_scheduler`, `--max_grad_norm`."""
    lr: float = opt(5e-7, help="Peak learning rate.")
    weight_decay: float = opt(0.0, help="AdamW weight decay.")
    warmup_ratio: float = opt(0.1, help="Fraction of the steps spent warming up.")
    lr_scheduler: str = opt("linear", choices=SCHEDULERS, help="Decay after warm-up.")
    max_grad_norm: float = opt(1.0, help="Clip the global gradient norm (0: no clipping; the norm is still "
                               "logged).")

    def __post_init__(self):
        check_choices(self)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise OptionError(self, ("warmup_ratio",), f"{{}} must be in [0, 1) (got {self.warmup_ratio})")
        if self.lr <= 0:
            raise OptionError(self, ("lr",), f"{{}} must be positive (got {self.lr})")


@dataclass(frozen=True)
class LoopConfig:
    """`--batch_size` (per process), `--grad_accum`, `--epochs`/`--max_steps`, `--seed`, evaluation, saving."""
    batch_size: int = opt(8, help="Rows (pairs, or KTO examples) per micro-batch per process.")
    grad_accum: int = opt(1, help="Micro-batches per optimizer step.")
    epochs: int = opt(1, help="Passes over the data.")
    max_steps: int | None = opt(None, help="Optimizer steps; overrides --epochs.")
    seed: int = opt(0, help="Seed of the data order and the held-out split.")
    eval_fraction: float = opt(0.0, help="Hold out this fraction of rows (by row-id hash) and evaluate on them.")
    eval_every: int | None = opt(None, help="Steps between evaluations; there is always one at the end.",
                                 default_text="a quarter of the run")
    save_every: int = opt(0, help="Checkpoint every N steps (0: only the final model).")
    keep_checkpoints: int = opt(0, help="Keep only the newest N checkpoints (0: keep all).")
    resume: bool = opt(False, help="Continue each run from its last checkpoint; finished runs are skipped.")
    gradient_checkpointing: bool = opt(False, help="Recompute activations in backward to save memory.")
    overwrite: bool = opt(False, help="Replace the run directories this call writes (RUNS_DIR/<run>/) when they "
                          "already hold a run; other files in RUNS_DIR are kept.")
    padding_free: bool = opt(True, help="Pack each forward's sequences end to end in one row (position ids "
                             "restart per sequence; no padding). Falls back to padding, with a note, when the model's "
                             "attention cannot keep packed sequences apart.", off_help="Pad every micro-batch to its "
                             "longest sequence.")

    def __post_init__(self):
        if self.overwrite and self.resume:
            raise OptionError(self, ("overwrite", "resume"), "{} and {} exclude each other: --resume continues "
                              "the runs that --overwrite would delete")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise OptionError(self, ("batch_size", "grad_accum"), "{} and {} must be >= 1")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise OptionError(self, ("epochs", "max_steps"), "{} and {} must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise OptionError(self, ("eval_fraction",), f"{{}} must be in [0, 1) (got {self.eval_fraction})")
        if self.save_every < 0 or self.keep_checkpoints < 0 or (self.eval_every is not None and self.eval_every < 1):
            raise OptionError(self, ("save_every", "keep_checkpoints", "eval_every"),
                              "{} and {} must be >= 0, {} >= 1")


@dataclass(frozen=True)
class SourceConfig:
    """Where ids and reference log-probs come from, and how strictly the cache is checked.

    `cache` or `data` (one of them). `--reference cached` reads the reference from the cache; `live` scores each
    batch with a frozen copy of `--model` and reads only ids from the cache (or tokenizes `--data`).
    `input`: how `data` is read and tokenized (and, for a cache, the settings it was made with).
    """
    model: str = opt("", required=True, path=True, help="The SFT model directory (or hub id): the policy starts "
                     "here.")
    cache: str | None = opt(None, path=True, help="Cache directory written by `prefpipe precompute`.")
    data: str | None = opt(None, path=True, help="Preference data to tokenize directly (reference-free losses, "
                           "or --reference live).")
    reference: str = opt("cached", choices=REFERENCES, help="cached: reference log-probs from the cache. live: a "
                         "frozen copy of --model scores every batch.")
    allow_reference_mismatch: bool = opt(False, help="Train against a cache made from another model; the step-0 "
                                         "drift is then only logged.")
    max_drift: float = opt(0.1, allow_inf=True, help="Stop when the step-0 policy differs from the cached "
                           "reference by more than this many nats per response token (mean absolute; inf: never).")
    drift_rows: int = opt(32, help="Rows scored for the step-0 drift check (0: skip it).")
    input: InputSettings = group(InputSettings)

    def __post_init__(self):
        check_choices(self)
        if bool(self.cache) == bool(self.data):
            raise OptionError(self, ("cache", "data"), "give exactly one of {} (ids and reference log-probs from "
                              "precompute) and {} (tokenized here: reference-free losses or --reference live)")
        if self.max_drift < 0 or self.drift_rows < 0:
            raise OptionError(self, ("max_drift", "drift_rows"), "{} and {} must be >= 0")


@dataclass(frozen=True)
class LoraConfig:
    """`--lora_r` and its knobs (peft's LoRA). `--lora_r 0` is a full fine-tune.

    `lora_dropout` defaults to 0: the policy is kept in train mode (for gradient checkpointing), so a positive
    dropout is active in every policy forward, and the step-0 "policy == reference" identity (and the drift check,
    and the step-1 metrics) then hold only in expectation. `--merge` also writes `<run>/final-merged/`, the
    adapter folded into a plain Hugging Face checkpoint. `--load_in_4bit` loads the frozen weights in 4-bit NF4
    (QLoRA; CUDA and bitsandbytes only)."""
    lora_r: int = opt(0, help="LoRA rank (0: full fine-tune). The adapter is trained on the frozen SFT model; "
                      "checkpoints and final/ hold only the adapter (PEFT format).")
    lora_alpha: float | None = opt(None, help="LoRA scaling numerator (scale = alpha / r).",
                                   default_text="2 x --lora_r")
    lora_dropout: float = opt(0.0, help="Dropout on the LoRA path. Above 0 the step-0 policy no longer equals "
                              "the reference exactly (the policy runs in train mode): drift and step-1 metrics "
                              "become noisy.")
    lora_target_modules: tuple[str, ...] = opt(("all-linear",), help="Modules that get an adapter: "
                                               "all-linear, or repeat with module names (q_proj, v_proj, ...).")
    merge: bool = opt(False, help="LoRA: also write <run>/final-merged/, the adapter merged into the weights.")
    load_in_4bit: bool = opt(False, help="QLoRA: load the frozen weights in 4-bit NF4 (needs --lora_r, CUDA and "
                             "bitsandbytes).")

    def __post_init__(self):
        if self.lora_r < 0:
            raise OptionError(self, ("lora_r",), f"{{}} must be >= 0 (got {self.lora_r})")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise OptionError(self, ("lora_dropout",), f"{{}} must be in [0, 1) (got {self.lora_dropout})")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise OptionError(self, ("lora_alpha",), f"{{}} must be positive (got {self.lora_alpha})")
        if not self.lora_target_modules:
            raise OptionError(self, ("lora_target_modules",), "{} needs at least one value")
        if not self.enabled and (self.merge or self.load_in_4bit):
            raise OptionError(self, ("merge", "load_in_4bit", "lora_r"), "{} and {} need a LoRA run ({} > 0)")

    @property
    def enabled(self) -> bool:
        return self.lora_r > 0


@dataclass(frozen=True)
class TrainConfig:
    """Everything `prefpipe train` takes. `loss_types` x `betas` are the sweep; see `runs()`."""
    source: SourceConfig = group(SourceConfig, required=True)
    out: str = opt(required=True, path=True, help="RUNS_DIR: each run goes to RUNS_DIR/<loss>-beta<beta>/ (orpo, "
                   "sft: RUNS_DIR/<loss>/).")
    loss_types: tuple[str, ...] = opt(("dpo",), name="loss_type", metavar="LOSS", help=_LOSS_HELP)
    betas: tuple[float, ...] = opt((0.1,), name="beta",
                                   help="Repeat for a beta sweep: one run per value, from the one loaded cache.")
    loss: LossConfig = group(LossConfig)  # the shared knobs; loss_type/beta come from the sweep
    optim: OptimConfig = group(OptimConfig)
    loop: LoopConfig = group(LoopConfig)
    dtype: str = opt("auto", choices=DTYPES, help="Compute dtype (autocast); weights and optimizer stay float32. "
                     "auto: bf16 on GPU, float32 on CPU.")
    device: str = opt("auto", help="auto, cpu, cuda or cuda:N.")
    fsdp: bool = opt(False, help="Shard the policy (and a live reference) with FSDP2 under torchrun.")
    lora: LoraConfig = group(LoraConfig)
    progress: bool = opt(True, help="Progress bar.", off_help="No progress bar.")
    report_to: tuple[str, ...] = opt(("none",), choices=REPORT_TO_CHOICES,
                                     help="Also send metrics.jsonl and the resolved config to TensorBoard "
                                     "(<run>/tensorboard/) and/or W&B (<run>/wandb/; $WANDB_PROJECT, "
                                     "$WANDB_RUN_GROUP, WANDB_MODE=offline). Repeat for both.")

    def __post_init__(self):
        check_choices(self)
        object.__setattr__(self, "loss_types", tuple(canonical_loss_type(self, "loss_types", lt)
                                                     for lt in self.loss_types))
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        check_installed(self.report_to)
        if not self.loss_types or not self.betas:
            raise OptionError(self, ("loss_types", "betas"), "{} and {} need at least one value")
        for b in self.betas:
            if b <= 0:
                raise OptionError(self, ("betas",), f"every {{}} must be positive (got {b:g})")
        unread = unread_knobs(self.loss_types, self.loss.knobs())
        if unread:
            raise OptionError(self.loss, (unread[0],), f"{{}} is read by no loss of this call "
                              f"({', '.join(self.loss_types)}): drop it, or add a loss that takes it")
        self.runs()  # a loss option that does not fit one of the losses stops here, before any work

    def runs(self) -> list[LossConfig]:
        """One LossConfig per run, in order: each loss type, then each beta. Losses that do not use beta (orpo,
        sft, and combinations of them) run once (named `orpo`, `sft`). Loss types are canonical (`sigmoid` is
        `dpo`), so a loss typed twice under two spellings runs once."""
        out = []
        for lt in dict.fromkeys(self.loss_types):
            for beta in (dict.fromkeys(self.betas) if LOSSES[lt].uses_beta else self.betas[:1]):
                out.append(replace(self.loss, loss_type=lt, beta=float(beta)))
        return out

    def resolved(self, loss: LossConfig) -> dict:
        """The JSON written next to each run and checkpoint."""
        d = asdict(self)
        d.pop("loss_types"), d.pop("betas"), d.pop("progress"), d.pop("report_to")
        d["source"].update(d["source"].pop("input"))  # flat, as runs have always recorded it
        d["loss"] = asdict(loss)
        return d
