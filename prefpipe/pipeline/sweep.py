"""Which losses of a pipeline train from which data: the one grouping the settings checks and the run share."""

from __future__ import annotations

from prefpipe.train.registry import LOSSES, resolve_loss_type


def split_losses(losses) -> tuple[tuple, tuple]:
    """(losses trained on pairs, losses trained on KTO examples), canonical names, each in order once. The second
    group (kto, apo_zero_unpaired) trains from the KTO cache with the `kto_*` settings."""
    names = tuple(dict.fromkeys(resolve_loss_type(lt) for lt in losses))
    return (tuple(n for n in names if LOSSES[n].paired), tuple(n for n in names if not LOSSES[n].paired))


def needs_reference(losses) -> bool:
    """Whether any of `losses` (canonical names) reads reference log-probs, so that a paired cache is made."""
    return any(LOSSES[lt].needs_reference for lt in losses)
