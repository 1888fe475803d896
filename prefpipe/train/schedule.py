"""The learning-rate schedule shared by `prefpipe train` and the demo's SFT stage."""

from __future__ import annotations

import math

SCHEDULERS = ("linear", "cosine", "constant")


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for 0-based step `step`.

    Linear warm-up over `warmup` steps reaches 1.0 at the last warm-up step (so the first step already moves),
    then `kind` decays to 0 at step `total` (linear, cosine) or stays at 1.0 (constant).
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
