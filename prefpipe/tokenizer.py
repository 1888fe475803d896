"""Loading a tokenizer, without torch where a command needs nothing else (`prefpipe data check`).

transformers 5 imports torch to load any tokenizer through `AutoTokenizer` (its config classes import it when it
is installed), although no tokenizer uses it: `data check` spent most of its 4-8 s importing torch. A process that
will load tokenizers and never a model calls `tokenizer_only_process()` first, which hides torch from
transformers exactly as on an install without torch, so that AutoTokenizer picks the same tokenizer class and
tokenizes the same way, in a second. transformers records at import whether torch exists, so this is only done
in a process that has imported neither (the CLI's own, never a test's or a library caller's).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prefpipe.errors import UserError
from prefpipe.model_paths import adapter_base, is_adapter_dir, model_ref

# The vocabulary files of the common tokenizers (tokenizer_config.json alone loads nothing), named when a directory
# holds none of them; and the files that mark an adapter directory as carrying its own tokenizer.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def tokenizer_only_process() -> bool:
    """Hide torch from the rest of this process (see the module docstring); True when it was hidden."""
    if "torch" in sys.modules or any(m == "transformers" or m.startswith("transformers.") for m in sys.modules):
        return False
    sys.modules["torch"] = None  # importlib.util.find_spec("torch") is None; `import torch` raises ImportError
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found" is expected here
    return True


def quiet_transformers():
    """Silence transformers' per-load progress bars and advisory warnings in CLI output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def load_tokenizer(model: str):
    model = model_ref(str(model))  # a mistyped path fails here, not after the hub client's retries
    model = _tokenizer_dir(model)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - the `tokenizers` library raises bare Exception for files it rejects
        if Path(model).is_dir() and not any((Path(model) / f).exists() for f in VOCAB_FILES):
            # transformers' own message then ends in an empty list ("from one of: )")
            raise UserError(f"no tokenizer files in this directory (looked for {', '.join(VOCAB_FILES)})",
                            file=model) from None
        raise UserError(f"cannot load a tokenizer ({_library_message(e)})", file=_rejected_file(model)) from None
    if tok.pad_token_id is None:
        # Padding is masked out everywhere; any id works, and EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def _library_message(e: Exception) -> str:
    """The library's own words on one line; a bare KeyError's text ('added_tokens') needs its type to mean much."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}" if isinstance(e, (LookupError, TypeError, AttributeError)) else text


def _rejected_file(model: str) -> str:
    """The tokenizer file a failed load most likely tripped on: a JSON file that does not parse, else a
    `tokenizer.json` that the `tokenizers` library refuses, else the directory (or hub id) itself."""
    import json

    d = Path(model)
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        try:
            json.loads((d / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return str(d / name)
    if (d / "tokenizer.json").is_file():
        from tokenizers import Tokenizer
        try:
            Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception:  # noqa: BLE001 - see load_tokenizer
            return str(d / "tokenizer.json")
    return model


def _tokenizer_dir(model: str) -> str:
    """An adapter directory without tokenizer files uses its base's tokenizer."""
    while is_adapter_dir(model) and not any((Path(model) / f).exists() for f in TOKENIZER_FILES):
        model = adapter_base(model)
    return model
