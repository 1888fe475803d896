"""The one progress bar every stage shows (precompute, train, eval generation, the demo's SFT and sampling): tqdm on
stderr with a total, so it shows n/N, the rate and an ETA; and `around_bars`, for log lines printed while a bar is
up. (prefpipe.precompute.progress counts the rows that give precompute's bar its total.)"""

from __future__ import annotations

import sys


def progress_bar(total: int | None, desc: str, unit: str = "it", show: bool | None = True, initial: int = 0):
    """A bar over `total` units. `show`: True draws it (also into a log file or a pipe, as a user running with
    `2> log` still wants to see how far a run got), False hides it, None draws it only on a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if show is None else not show,
                dynamic_ncols=True, mininterval=0.5, file=sys.stderr)


def around_bars(log):
    """`log`, writing its line above any progress bar instead of through it."""
    from tqdm import tqdm

    def write(msg):
        with tqdm.external_write_mode(file=sys.stderr):
            log(msg)
    return write
