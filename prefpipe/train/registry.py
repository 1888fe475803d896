"""The loss registry: one `LossSpec` per `--loss_type`. No torch here, so the CLI can list the choices cheaply.

A spec names its pure function in `prefpipe.train.losses` and says what that function is called with:

- `inputs`: the per-example tensors, by name, in the function's positional order. Paired batches offer `pi_c`,
  `pi_r` (policy log-prob sums of chosen and rejected), `ref_c`, `ref_r` (the reference's), `len_c`, `len_r`
  (scored response tokens); chosen-only batches the `*_c` ones; KTO batches `pi`, `ref`, `len`, `desirable`,
  and whatever the pre-step adds (`z0`). A loss needs the reference exactly when it takes a `ref*` input.
- `params`: what its function takes as keywords: `beta` (a loss uses beta exactly when it is among them) and
  the names of its knobs, the `Knob`s declared in `KNOBS` just above the entries that read them. A knob is the
  loss's own option: its default, help and valid range live in that one declaration, and `LossConfig` (so the
  `prefpipe train` flag, the pipeline key and `-h`) is generated from `KNOBS`. A knob given a non-default value
  that none of a call's losses reads is refused (`unread_knobs`).
- `selects`: `(knob, variant)` pairs: a knob that, when set, makes the run train another entry (`dpo` with
  `--ld_alpha` trains `ld_dpo`, whose per-token inputs a `--per_token` cache must provide). `LossConfig.spec` is
  the entry a run trains, resolved once.
- `acc_kind`, `acc_label`, `margin_label`: what the logged `acc` and `margin` mean (the report's ranking basis and
  axis labels); losses with the same meanings share a column of the report's plots.
- `batch`: which sequences the policy forwards (`PAIRS`, `CHOSEN`, `EXAMPLES`).
- `metrics`: the per-example metric names its `LossOutput` carries (logged as their global means; `margin` is
  added whenever `r_chosen` is there).
- `prestep`: the name of a pre-step in `prefpipe.train.batch_loss.PRESTEPS`, run over the whole global batch on
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
import math
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from prefpipe.wording import did_you_mean

PAIRS = "pairs"  # pairs, chosen and rejected forwarded together
CHOSEN = "chosen"  # pairs, only the chosen response forwarded
EXAMPLES = "examples"  # KTO examples, each with its pinned mismatched partner
BATCH_SHAPES = (PAIRS, CHOSEN, EXAMPLES)

_REWARDS = ("acc", "r_chosen", "r_rejected")


@dataclass(frozen=True)
class Knob:
    """One loss option (module docstring). `valid(value)` says whether a value is allowed, `rule` says so in words
    ("in [0, 0.5)"); `needs` is another knob's required value when this one is not at its default."""
    name: str
    default: Any
    help: str
    valid: Callable[[Any], bool] = math.isfinite
    rule: str = "a finite number"
    kind: type = float
    choices: tuple | None = None
    needs: tuple | None = None  # (other knob, the value it must have)
    metavar: str | None = None
    default_text: str | None = None


def _positive(v) -> bool:
    return math.isfinite(v) and v > 0


def _non_negative(v) -> bool:
    return math.isfinite(v) and v >= 0


LABEL_SMOOTHING = Knob("label_smoothing", 0.0, "Probability eps that a preference label is flipped. dpo: "
                       "conservative DPO; robust: robust DPO; aot, aot_unpaired: smoothed like cDPO; exo_pair: the "
                       "target (1-eps, eps), 0 meaning 1e-3.", lambda v: 0.0 <= v < 0.5, "in [0, 0.5)")
F_DIVERGENCE = Knob("f_divergence", "reverse_kl", "dpo only: the f-divergence of f-DPO (reverse_kl is plain DPO).",
                    lambda v: True, "", str, choices=("reverse_kl", "forward_kl", "js", "alpha"))
F_ALPHA = Knob("f_alpha", 1.0, "dpo with --f_divergence alpha: alpha (1: reverse KL, 0: forward KL).",
               needs=("f_divergence", "alpha"))
LD_ALPHA = Knob("ld_alpha", None, "dpo: LD-DPO, weight in [0, 1] of the tokens beyond the shorter response's "
                "length (1: plain DPO). Needs a --per_token cache (or --reference live). One value per call; the run "
                "is named <loss>-beta<beta>-ld<alpha>.", lambda v: 0.0 <= v <= 1.0, "in [0, 1]", metavar="ALPHA",
                default_text="off")
DESIRABLE_WEIGHT = Knob("desirable_weight", 1.0, "kto, apo_zero_unpaired: lambda_D.", _positive, "positive")
UNDESIRABLE_WEIGHT = Knob("undesirable_weight", 1.0, "kto, apo_zero_unpaired: lambda_U.", _positive, "positive")
ORPO_LAMBDA = Knob("orpo_lambda", 1.0, "orpo: weight of the odds-ratio term.", _non_negative, ">= 0")


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
    selects: tuple = ()  # ((knob name, variant name), ...)
    acc_kind: str = "reward accuracy"
    acc_label: str = "reward accuracy"
    margin_label: str = "margin / β (log-ratio, nats)"

    @property
    def needs_reference(self) -> bool:
        return any(i.startswith("ref") for i in self.inputs)

    @property
    def needs_per_token_reference(self) -> bool:
        """Takes per-token reference log-probs (a `--per_token` cache, or the live reference)."""
        return any(i.startswith("ref") and i.endswith("_tok") for i in self.inputs)

    @property
    def reads(self) -> tuple:
        """The knobs this entry reads: its function's and those that select a variant."""
        return tuple(p for p in self.params if p != "beta") + tuple(k for k, _ in self.selects)

    @property
    def uses_beta(self) -> bool:
        return "beta" in self.params

    @property
    def paired(self) -> bool:
        """Trains on a paired cache (else on a KTO cache of single examples)."""
        return self.batch != EXAMPLES


_PAIR_REF = ("pi_c", "pi_r", "ref_c", "ref_r")

_PER_TOKEN = dict(acc_kind="per-token reward accuracy", acc_label="reward accuracy (per-token log-ratios)",
                  margin_label="margin / β (per-token log-ratio)")
_KTO = dict(acc_kind="KTO accuracy", acc_label="KTO accuracy (h on the right side of z0)")
SPECS = (
    LossSpec("dpo", "dpo_loss", _PAIR_REF, ("beta", "label_smoothing", "f_divergence", "f_alpha"), PAIRS, _REWARDS,
             selects=(("ld_alpha", "ld_dpo"),)),
    LossSpec("ipo", "ipo_loss", _PAIR_REF + ("len_c", "len_r"), ("beta",), PAIRS, _REWARDS, **_PER_TOKEN),
    LossSpec("hinge", "hinge_loss", _PAIR_REF, ("beta",), PAIRS, _REWARDS),
    LossSpec("kto", "kto_loss", ("pi", "ref", "desirable", "z0"),
             ("beta", "desirable_weight", "undesirable_weight"), EXAMPLES, _REWARDS, prestep="kto_z0", **_KTO),
    LossSpec("orpo", "orpo_loss", ("pi_c", "pi_r", "len_c", "len_r"), ("orpo_lambda",), PAIRS,
             _REWARDS + ("nll", "log_odds"), acc_kind="ORPO accuracy",
             acc_label="ORPO accuracy (a_c > a_r, per-token log-probs)", margin_label="a_c − a_r (per-token log-prob)"),
    LossSpec("sft", "sft_loss", ("pi_c", "len_c"), (), CHOSEN, ("nll",), acc_kind="", acc_label="",
             margin_label=""),
)

# Variants of an entry that a knob selects (its `selects`), not `--loss_type` choices of their own: `dpo` with
# `--ld_alpha` trains `ld_dpo`. Their `*_tok` inputs are per-token log-probs,
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
DISCOPOP_TAU = Knob("discopop_tau", 0.05, "discopop: temperature tau of the log-ratio modulation.", _positive,
                    "positive")
DPOP_LAMBDA = Knob("dpop_lambda", 50.0, "dpop: weight lambda of the penalty on a chosen log-prob below the "
                   "reference's.", _non_negative, ">= 0")
SIMPO_GAMMA = Knob("simpo_gamma", 0.5, "simpo: target reward margin gamma.")
CPO_ALPHA = Knob("cpo_alpha", 1.0, "cpo: weight of the chosen responses' NLL.", _non_negative, ">= 0")
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
    LossSpec("sigmoid_norm", "sigmoid_norm_loss", _PAIR_REF_LEN, ("beta",), PAIRS, _REWARDS, **_PER_TOKEN),
    LossSpec("dpop", "dpop_loss", _PAIR_REF, ("beta", "dpop_lambda"), PAIRS, _REWARDS),
    LossSpec("apo_zero_unpaired", "apo_zero_unpaired_loss", ("pi", "ref", "desirable"),
             ("beta", "desirable_weight", "undesirable_weight"), EXAMPLES, _REWARDS,
             acc_kind="APO accuracy", acc_label="APO accuracy (h on the right side of 0)"),
    LossSpec("simpo", "simpo_loss", ("pi_c", "pi_r", "len_c", "len_r"), ("beta", "simpo_gamma"), PAIRS, _REWARDS,
             acc_kind="SimPO accuracy", acc_label="SimPO accuracy (per-token log-probs)",
             margin_label="margin / β (per-token log-prob)"),
    LossSpec("cpo", "cpo_loss", ("pi_c", "pi_r", "len_c"), ("beta", "cpo_alpha"), PAIRS, _REWARDS + ("nll",),
             acc_kind="CPO accuracy", acc_label="CPO accuracy (log-probs)", margin_label="margin / β (log-prob, "
             "nats)"),
)

# Every knob, in the order `prefpipe train -h` lists them.
KNOBS = {k.name: k for k in (LABEL_SMOOTHING, F_DIVERGENCE, F_ALPHA, DISCOPOP_TAU, DPOP_LAMBDA, SIMPO_GAMMA,
                             CPO_ALPHA, DESIRABLE_WEIGHT, UNDESIRABLE_WEIGHT, ORPO_LAMBDA, LD_ALPHA)}


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
F_DIVERGENCES = F_DIVERGENCE.choices  # --f_divergence (see losses.f_divergence_score)


def entry_for(loss_type: str, knobs: dict) -> LossSpec:
    """The entry a run of `loss_type` trains with these knob values: the registered one, or the variant a set knob
    selects (module docstring, `selects`)."""
    s = LOSSES[loss_type]
    for knob, variant in s.selects:
        if knobs.get(knob, KNOBS[knob].default) != KNOBS[knob].default:
            return VARIANTS[variant]
    return s


def unread_knobs(loss_types, knobs: dict) -> list[str]:
    """The knobs set away from their default that none of `loss_types` reads (a combination reads its terms')."""
    read = {k for lt in loss_types for k in _reads(lt)}
    return [name for name, knob in KNOBS.items() if name in knobs and knobs[name] != knob.default
            and name not in read]


def _reads(loss_type: str) -> tuple:
    s = LOSSES[loss_type]
    return s.reads if not s.parts else tuple(k for _, n in s.parts for k in LOSSES[n].reads)


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
            raise ValueError(f"unknown loss {name!r}{did_you_mean(name, [*LOSSES, *ALIASES])}")
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
    # Metrics come from the first term that logs each name (`losses.Combination`), so do their meanings.
    meaning = next((s for s in specs if s.acc_kind), specs[0])
    return LossSpec(name, "", tuple(dict.fromkeys(i for s in specs for i in s.inputs)),
                    tuple(dict.fromkeys(p for s in specs for p in s.params)),
                    PAIRS if any(s.batch == PAIRS for s in specs) else CHOSEN, metrics, parts=parts,
                    acc_kind=meaning.acc_kind, acc_label=meaning.acc_label, margin_label=meaning.margin_label)
