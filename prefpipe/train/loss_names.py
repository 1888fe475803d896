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
- `parts`: empty for a registered loss; for a weighted combination, its `(weight, name)` terms (see below).

Names users may type beyond the registered ones (`resolve_loss_type` turns each into its canonical name, which is
what `LossConfig.loss_type`, train_config.json and summary.json hold):

- TRL's name `sigmoid` is an alias of `dpo` (so `--loss_type sigmoid` runs, and is named, `dpo-beta...`).
- A weighted combination, TRL's `loss_type` list with `loss_weights`, is written as one string of `+`-separated
  terms `WEIGHT*NAME` (a bare `NAME` has weight 1), e.g. `0.8*sigmoid+0.2*bco_pair+1*sft` (MPO). One string is
  one run, so a combination can never be mistaken for a sweep (a sweep repeats `--loss_type`, or is a TOML
  list), and combinations sweep over beta like any loss. Its per-example loss is the weighted sum of its
  terms' per-example losses. Its canonical name writes every weight: `0.8*dpo+0.2*bco_pair+1*sft`; its run
  directory drops the `*`: `0.8dpo+0.2bco_pair+1sft-beta0.1`. Only paired losses combine (not kto or
  apo_zero_unpaired); a term may not repeat; weights are positive. `LOSSES[text]` accepts any such text.
"""

from __future__ import annotations

import functools
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
    parts: tuple = ()  # a combination's ((weight, registered name), ...); fn is "" then

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
    LossSpec("dpo", "dpo_loss", _PAIR_REF, ("beta", "label_smoothing", "f_divergence", "f_alpha"), PAIRS, _REWARDS),
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


# The rest of TRL's DPO loss family (as TRL 1.16's DPO trainer defines them, under TRL's names), then DPO-Positive, the unpaired APO, and
# the reference-free SimPO and CPO.
_PAIR_REF_LEN = _PAIR_REF + ("len_c", "len_r")
_BETA_EPS = ("beta", "label_smoothing")
FAMILY_SPECS = (
    LossSpec("robust", "robust_loss", _PAIR_REF, _BETA_EPS, PAIRS, _REWARDS),
    LossSpec("exo_pair", "exo_pair_loss", _PAIR_REF, _BETA_EPS, PAIRS, _REWARDS),
    LossSpec("nca_pair", "nca_pair_loss", _PAIR_REF, ("beta",), PAIRS, _REWARDS),
    LossSpec("bco_pair", "bco_pair_loss", _PAIR_REF, ("beta",), PAIRS, _REWARDS),
    LossSpec("sppo_hard", "sppo_hard_loss", _PAIR_REF, ("beta",), PAIRS, _REWARDS),
    LossSpec("aot", "aot_loss", _PAIR_REF, _BETA_EPS, PAIRS, _REWARDS),
    LossSpec("aot_unpaired", "aot_unpaired_loss", _PAIR_REF, _BETA_EPS, PAIRS, _REWARDS),
    LossSpec("apo_zero", "apo_zero_loss", _PAIR_REF, ("beta",), PAIRS, _REWARDS),
    LossSpec("apo_down", "apo_down_loss", _PAIR_REF, ("beta",), PAIRS, _REWARDS),
    LossSpec("discopop", "discopop_loss", _PAIR_REF, ("beta", "discopop_tau"), PAIRS, _REWARDS),
    LossSpec("sigmoid_norm", "sigmoid_norm_loss", _PAIR_REF_LEN, ("beta",), PAIRS, _REWARDS),
    LossSpec("dpop", "dpop_loss", _PAIR_REF, ("beta", "dpop_lambda"), PAIRS, _REWARDS),
    LossSpec("apo_zero_unpaired", "apo_zero_unpaired_loss", ("pi", "ref", "desirable"),
             ("beta", "desirable_weight", "undesirable_weight"), EXAMPLES, _REWARDS),
    LossSpec("simpo", "simpo_loss", ("pi_c", "pi_r", "len_c", "len_r"), ("beta", "simpo_gamma"), PAIRS, _REWARDS),
    LossSpec("cpo", "cpo_loss", ("pi_c", "pi_r", "len_c"), ("beta", "cpo_alpha"), PAIRS, _REWARDS + ("nll",)),
)


class _Registry(dict):
    """Registered name -> spec; looking up any other text resolves it (alias or combination) or raises KeyError."""

    def __missing__(self, text):
        try:
            return _resolved_spec(text)
        except ValueError as e:
            raise KeyError(text) from e


LOSSES = _Registry((s.name, s) for s in SPECS + FAMILY_SPECS)
LOSS_TYPES = tuple(LOSSES)
PAIRED_LOSSES = tuple(n for n, s in LOSSES.items() if s.paired)
REFERENCE_FREE = tuple(n for n, s in LOSSES.items() if not s.needs_reference)
WITHOUT_BETA = tuple(n for n, s in LOSSES.items() if not s.uses_beta)


def spec(name: str) -> LossSpec:
    return LOSSES[name]


ALIASES = {"sigmoid": "dpo"}  # TRL's loss_type names that are ours under another name
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")  # --f_divergence (see losses.f_divergence_score)


def _weight_text(w: float) -> str:
    """Shortest text that reads back as exactly `w` (`1`, `0.8`, `0.123456789`)."""
    short = format(w, "g")
    return short if float(short) == w else repr(w)


def _parse_terms(text: str) -> list[tuple[float, str]]:
    terms = []
    for raw in text.replace(" ", "").split("+"):
        w_text, star, name = raw.rpartition("*")
        name = ALIASES.get(name.lower(), name.lower())  # names are case-insensitive: `DPO` is `dpo`
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}")
        try:
            w = float(w_text) if star else 1.0
        except ValueError:
            raise ValueError(f"the weight {w_text!r} of {name} is not a number") from None
        if not (w > 0 and w < float("inf")):
            raise ValueError(f"the weight of {name} must be positive and finite")
        if name in (n for _, n in terms):
            raise ValueError(f"{name} appears twice")
        terms.append((w, name))
    return terms


def resolve_loss_type(text: str) -> str:
    """The canonical name of a `--loss_type` value: a registered name, an alias's target, or a combination with
    every weight written (`0.8*dpo+1*sft`). A single term of weight 1 is that loss itself. Raises ValueError with
    a message for the user."""
    text = str(text).strip()
    if text in LOSSES:
        return text
    terms = _parse_terms(text)
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]
    unpaired = [n for _, n in terms if not LOSSES[n].paired]
    if unpaired:
        raise ValueError(f"{', '.join(unpaired)} trains on single examples and cannot be combined")
    return "+".join(f"{_weight_text(w)}*{n}" for w, n in terms)


def run_label(loss_type: str) -> str:
    """A canonical loss name as a file name: a combination without its `*` (`0.8dpo+1sft`)."""
    return loss_type.replace("*", "")


@functools.cache
def _resolved_spec(text: str) -> LossSpec:
    name = resolve_loss_type(text)
    if name in LOSSES:
        return LOSSES[name]
    parts = tuple((float(w), n) for w, _, n in (t.partition("*") for t in name.split("+")))
    specs = [LOSSES[n] for _, n in parts]
    metrics = tuple(dict.fromkeys([m for s in specs for m in s.metrics] + [f"loss_{n}" for _, n in parts]))
    return LossSpec(name, "", tuple(dict.fromkeys(i for s in specs for i in s.inputs)),
                    tuple(dict.fromkeys(p for s in specs for p in s.params)),
                    PAIRS if any(s.batch == PAIRS for s in specs) else CHOSEN, metrics, parts=parts)
