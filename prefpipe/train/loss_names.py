"""The loss registry: one `LossSpec` per `--loss_type`. No torch here, so the CLI can list the choices cheaply.

A spec names its pure function in `prefpipe.train.losses` and says what that function is called with:

- `inputs`: the per-example tensors, by name, in the function's positional order. Paired batches offer `pi_c`,
  `pi_r` (policy log-prob sums of chosen and rejected), `ref_c`, `ref_r` (the reference's), `len_c`, `len_r`
  (scored response tokens); chosen-only batches the `*_c` ones; KTO batches `pi`, `ref`, `len`, `desirable`,
  and whatever the pre-step adds (`z0`). A loss needs the reference exactly when it takes a `ref*` input.
- `params`: the `LossConfig` fields it reads, passed as keywords of the same name. A loss uses beta exactly when
  `beta` is among them.
- `batch`: which sequences the policy forwards (`PAIRS`, `CHOSEN`, `EXAMPLES`).
- `metrics`: the per-example metric names its `LossOutput` carries (logged as their global means; `margin` is
  added whenever `r_chosen` is there).
- `prestep`: the name of a pre-step in `prefpipe.train.objective.PRESTEPS`, run over the whole global batch on
  every process before any gradient (KTO's reference point z0), or None.
"""

from __future__ import annotations

from dataclasses import dataclass

PAIRS = "pairs"  # pairs, chosen and rejected forwarded together
CHOSEN = "chosen"  # pairs, only the chosen response forwarded
EXAMPLES = "examples"  # KTO examples, each with its pinned mismatched partner
BATCH_SHAPES = (PAIRS, CHOSEN, EXAMPLES)

_REWARDS = ("acc", "r_chosen", "r_rejected")


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: str  # attribute of prefpipe.train.losses
    inputs: tuple
    params: tuple
    batch: str
    metrics: tuple
    prestep: str | None = None

    @property
    def needs_reference(self) -> bool:
        return any(i.startswith("ref") for i in self.inputs)

    @property
    def uses_beta(self) -> bool:
        return "beta" in self.params

    @property
    def paired(self) -> bool:
        """Trains on a paired cache (else on a KTO cache of single examples)."""
        return self.batch != EXAMPLES


_PAIR_REF = ("pi_c", "pi_r", "ref_c", "ref_r")

SPECS = (
    LossSpec("dpo", "dpo_loss", _PAIR_REF, ("beta", "label_smoothing"), PAIRS, _REWARDS),
    LossSpec("ipo", "ipo_loss", _PAIR_REF + ("len_c", "len_r"), ("beta",), PAIRS, _REWARDS),
    LossSpec("hinge", "hinge_loss", _PAIR_REF, ("beta",), PAIRS, _REWARDS),
    LossSpec("kto", "kto_loss", ("pi", "ref", "desirable", "z0"),
             ("beta", "desirable_weight", "undesirable_weight"), EXAMPLES, _REWARDS, prestep="kto_z0"),
    LossSpec("orpo", "orpo_loss", ("pi_c", "pi_r", "len_c", "len_r"), ("orpo_lambda",), PAIRS,
             _REWARDS + ("nll", "log_odds")),
    LossSpec("sft", "sft_loss", ("pi_c", "len_c"), (), CHOSEN, ("nll",)),
)

# Variants of an entry of SPECS that a LossConfig option selects, not `--loss_type` choices of their own: `dpo`
# with `--ld_alpha` trains `ld_dpo` (see `LossConfig.variant`). Their `*_tok` inputs are per-token log-probs,
# `[B, T]` zero-padded: the policy's from its forward, the reference's from a `--per_token` cache (or the live
# reference).
VARIANTS = {
    "ld_dpo": LossSpec("ld_dpo", "ld_dpo_loss", _PAIR_REF + ("len_c", "len_r", "pi_c_tok", "pi_r_tok", "ref_c_tok",
                                                             "ref_r_tok"),
                       ("beta", "label_smoothing", "ld_alpha"), PAIRS, _REWARDS),
}

LOSSES = {s.name: s for s in SPECS}
LOSS_TYPES = tuple(LOSSES)
PAIRED_LOSSES = tuple(n for n, s in LOSSES.items() if s.paired)
REFERENCE_FREE = tuple(n for n, s in LOSSES.items() if not s.needs_reference)
WITHOUT_BETA = tuple(n for n, s in LOSSES.items() if not s.uses_beta)


def spec(name: str) -> LossSpec:
    return LOSSES[name]
