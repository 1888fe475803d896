"""Training settings: small dataclasses, each mapping one-to-one to a group of `prefpipe train` options."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prefpipe.data.formats import DEFAULT_TURN_MARKER, Columns
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.errors import UserError
from prefpipe.train.losses import LOSS_TYPES, REFERENCE_FREE
from prefpipe.train.schedule import SCHEDULERS

REFERENCES = ("cached", "live")


@dataclass(frozen=True)
class LossConfig:
    """One run's objective: `--loss_type`, one `--beta`, `--label_smoothing`, KTO weights, `--orpo_lambda`."""
    loss_type: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    orpo_lambda: float = 1.0

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"unknown --loss_type {self.loss_type!r}; choose {', '.join(LOSS_TYPES)}")
        if self.beta <= 0:
            raise UserError(f"--beta must be positive (got {self.beta})")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label_smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise UserError("--desirable_weight and --undesirable_weight must be positive")
        if self.orpo_lambda < 0:
            raise UserError(f"--orpo_lambda must be >= 0 (got {self.orpo_lambda})")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type not in REFERENCE_FREE

    @property
    def run_name(self) -> str:
        """The run's directory under `--out`: `<loss>-beta<beta>`, or just `<loss>` for a loss without beta."""
        return self.loss_type if self.loss_type in REFERENCE_FREE else f"{self.loss_type}-beta{self.beta:g}"


@dataclass(frozen=True)
class OptimConfig:
    """`--lr`, `--weight_decay`, `--warmup_ratio`, `--lr_scheduler`, `--max_grad_norm`."""
    lr: float = 5e-7
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)

    def __post_init__(self):
        if self.lr_scheduler not in SCHEDULERS:
            raise UserError(f"unknown --lr_scheduler {self.lr_scheduler!r}; choose {', '.join(SCHEDULERS)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"--warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive (got {self.lr})")


@dataclass(frozen=True)
class LoopConfig:
    """`--batch_size` (per process), `--grad_accum`, `--epochs`/`--max_steps`, `--seed`, evaluation, saving."""
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # overrides --epochs when given
    seed: int = 0
    eval_fraction: float = 0.0
    eval_every: int | None = None  # default: about four times per run, and always at the end
    save_every: int = 0  # 0: only the final model
    keep_checkpoints: int = 0  # 0: keep every checkpoint
    resume: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise UserError("--batch_size and --grad_accum must be >= 1")
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise UserError("--epochs and --max_steps must be >= 1")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"--eval_fraction must be in [0, 1) (got {self.eval_fraction})")
        if self.save_every < 0 or self.keep_checkpoints < 0 or (self.eval_every is not None and self.eval_every < 1):
            raise UserError("--save_every and --keep_checkpoints must be >= 0, --eval_every >= 1")


@dataclass(frozen=True)
class SourceConfig:
    """Where ids and reference log-probs come from, and how strictly the cache is checked.

    `cache` or `data` (one of them). `--reference cached` reads the reference from the cache; `live` scores each
    batch with a frozen copy of `--model` and reads only ids from the cache (or tokenizes `--data`).
    """
    model: str = ""
    cache: str | None = None
    data: str | None = None
    reference: str = "cached"
    allow_reference_mismatch: bool = False
    max_drift: float = 0.1  # mean |policy - reference| log-prob per response token at step 0, in nats
    drift_rows: int = 32
    columns: Columns = field(default_factory=Columns)
    turn_marker: str = DEFAULT_TURN_MARKER
    max_length: int = TokenizeSettings.max_length
    max_prompt_length: int = TokenizeSettings.max_prompt_length

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise UserError(f"unknown --reference {self.reference!r}; choose cached or live")
        if bool(self.cache) == bool(self.data):
            raise UserError("give exactly one of --cache (ids and reference log-probs from precompute) and --data "
                            "(tokenized here: reference-free losses or --reference live)")
        if self.max_drift < 0 or self.drift_rows < 0:
            raise UserError("--max_drift and --drift_rows must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `prefpipe train` takes. `loss_types` x `betas` are the sweep; see `runs()`."""
    source: SourceConfig
    out: str
    loss_types: tuple = ("dpo",)
    betas: tuple = (0.1,)
    loss: LossConfig = field(default_factory=LossConfig)  # the shared knobs; loss_type/beta come from the sweep
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    dtype: str = "auto"
    device: str = "auto"
    fsdp: bool = False
    progress: bool = True

    def runs(self) -> list[LossConfig]:
        """One LossConfig per run, in order: each loss type, then each beta. Reference-free losses (orpo, sft)
        ignore beta, so they run once (named `orpo`, `sft`)."""
        out = []
        for lt in dict.fromkeys(self.loss_types):
            for beta in (self.betas[:1] if lt in REFERENCE_FREE else dict.fromkeys(self.betas)):
                out.append(LossConfig(lt, float(beta), self.loss.label_smoothing, self.loss.desirable_weight,
                                      self.loss.undesirable_weight, self.loss.orpo_lambda))
        return out

    def resolved(self, loss: LossConfig) -> dict:
        """The JSON written next to each run and checkpoint."""
        d = asdict(self)
        d.pop("loss_types"), d.pop("betas"), d.pop("progress")
        d["loss"] = asdict(loss)
        return d
