"""The rule that no pipeline key is silently without effect: a key the user set (in the file or on the command
line) that nothing in this combination reads is an error naming the key and the file, before any work.

Each entry of `EFFECTS` names keys and the condition under which the pipeline reads them; `no_effect` applies them
all the same way. Defaults are never refused (a default is not a choice the user made). The entries cover what the
pipeline decides: which caches, phases, run groups and evaluations there are. A knob inside one phase follows
that phase's own settings (`LossConfig`: a loss knob another loss reads is ignored, as in `prefpipe train`).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

from prefpipe.generation.config import GenerateConfig
from prefpipe.options import options
from prefpipe.pipeline.settings import PipelineEval, PipelineSettings
from prefpipe.pipeline.sweep import needs_reference, split_losses
from prefpipe.precompute.config import PrecomputeConfig
from prefpipe.train.config import TrainConfig
from prefpipe.train.registry import LOSSES


@dataclass(frozen=True)
class Combination:
    """What a resolved pipeline will do, derived once from its settings (loss names already checked)."""
    settings: PipelineSettings
    held_out: PipelineEval
    paired: tuple
    unpaired: tuple

    @classmethod
    def of(cls, settings: PipelineSettings, held_out: PipelineEval, losses: tuple) -> Combination:
        paired, unpaired = split_losses(losses)
        return cls(settings, held_out, paired, unpaired)

    @property
    def losses(self) -> tuple:
        return self.paired + self.unpaired

    @property
    def paired_cache(self) -> bool:
        return needs_reference(self.paired)

    @property
    def phase_one(self) -> bool:
        return self.paired_cache or bool(self.unpaired) or bool(self.held_out.data)

    @property
    def eval_pref(self) -> bool:
        return bool(self.held_out.data or self.held_out.cache)

    def reads(self, param: str, losses: tuple | None = None) -> bool:
        return any(param in LOSSES[lt].params for lt in (self.losses if losses is None else losses))



@dataclass(frozen=True)
class Effect:
    keys: tuple
    applies: Callable[[Combination], bool]
    needs: Callable[[Combination], str]  # why it has no effect, in this combination


def _losses(c: Combination) -> str:
    return ", ".join(c.losses)


# Keys that only the precompute phase reads (the tokenization and column keys are read by training too).
PRECOMPUTE_ONLY = tuple(o.name for o in options(PrecomputeConfig) if o.name not in {t.name for t in options(
    TrainConfig)} and o.name not in {"out", "kto", "no_reference", "overwrite", "progress"})
_GEN_ONLY = ("eval_prompt_template", "eval_chat", "eval_max_new_tokens", "eval_engine", "eval_limit",
             "eval_question_col", "eval_answer_col", "eval_baseline")

EFFECTS = [
    Effect(("cache",), lambda c: c.paired_cache,
           lambda c: f"the paired cache holds reference log-probs and no loss here ({_losses(c)}) reads them; "
           "they train from data"),
    Effect(("kto_data", "kto_cache", "kto_lr"), lambda c: bool(c.unpaired),
           lambda c: "it applies to losses on single examples (kto, apo_zero_unpaired), and loss_type has none"),
    Effect(("kto_beta",), lambda c: c.reads("beta", c.unpaired),
           lambda c: "no loss on single examples here uses beta"),
    Effect(("beta",), lambda c: c.reads("beta", c.paired) or (c.reads("beta", c.unpaired)
                                                              and c.settings.kto_beta is None),
           lambda c: f"no loss here ({_losses(c)}) reads it" + (" (kto runs take kto_beta)" if c.unpaired else "")),
    Effect(PRECOMPUTE_ONLY + ("recompute",), lambda c: c.phase_one,
           lambda c: f"phase one (precompute) does not run: no loss here ({_losses(c)}) needs reference "
           "log-probs, none trains on single examples and eval_data is not set"),
    Effect(_GEN_ONLY, lambda c: bool(c.held_out.gen), lambda c: "it applies to eval_gen, which is not set"),
    Effect(("reference_model",) + tuple("generate_" + o.name for o in options(GenerateConfig)),
           lambda c: c.settings.rounds is not None,
           lambda c: "it applies to on-policy rounds, and rounds is not set"),
    Effect(("eval_batch_size",), lambda c: bool(c.held_out.gen) or c.eval_pref,
           lambda c: "no evaluation runs (eval_gen, eval_data and eval_cache are not set)"),
]
assert len({k for e in EFFECTS for k in e.keys}) == sum(len(e.keys) for e in EFFECTS), "a key in two effects"


def no_effect(c: Combination, sources: dict) -> tuple[str, str] | None:
    """(the first key the user set that has no effect in `c`, why), or None; `sources`: where each key's value
    came from (prefpipe.pipeline.config.Source)."""
    for e in EFFECTS:
        given = [k for k in e.keys if sources.get(k) in ("file", "option")]
        if given and not e.applies(c):
            return given[0], e.needs(c)
    return None
