"""prefpipe's own warnings, and the third-party warnings the CLI hides.

`warn(message)` is how prefpipe warns: a `PrefpipeWarning` (a `UserWarning`, so library users filter or capture it
with the `warnings` module as usual) that prints as one line, ``prefpipe: warning: MESSAGE``, without the source
line Python shows by default. `quiet_third_party()` runs at CLI start only: deprecation notices from the
libraries prefpipe drives (transformers, peft, torch) name code a user of the command cannot change, so the
command hides them; a library user of prefpipe keeps Python's defaults, and `PYTHONWARNINGS` / `-W` still win.
"""

from __future__ import annotations

import sys
import warnings


class PrefpipeWarning(UserWarning):
    """Something a user may want to act on that does not stop the command."""


def warn(message: str):
    warnings.warn(message, PrefpipeWarning, stacklevel=2)


_plain_format = warnings.formatwarning


def _format(message, category, filename, lineno, line=None):
    if issubclass(category, PrefpipeWarning):
        return f"prefpipe: warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


warnings.formatwarning = _format

# Noise no user of the command can act on: deprecations inside the libraries, and torch's notice that it was
# built against another NumPy (it works without NumPy interop, which prefpipe does not use).
_THIRD_PARTY = [("ignore", FutureWarning, ""), ("ignore", DeprecationWarning, ""),
                ("ignore", PendingDeprecationWarning, ""), ("ignore", UserWarning, "Failed to initialize NumPy")]


def quiet_third_party():
    """Hide `_THIRD_PARTY` warnings in this (CLI) process, unless the user asked for warnings with -W or
    PYTHONWARNINGS."""
    if sys.warnoptions:
        return
    for action, category, message in _THIRD_PARTY:
        warnings.filterwarnings(action, category=category, message=message)
