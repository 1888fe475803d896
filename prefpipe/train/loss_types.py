"""The loss names, without the loss code: the CLI and the settings dataclasses take their choices from here, and
importing this module costs nothing (prefpipe.train.losses, which imports torch, re-exports them)."""

LOSS_TYPES = ("dpo", "ipo", "hinge", "kto", "orpo", "sft")
PAIRED_LOSSES = ("dpo", "ipo", "hinge", "orpo", "sft")
REFERENCE_FREE = ("orpo", "sft")  # need no reference log-probs and do not use beta
