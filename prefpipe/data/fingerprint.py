"""Fingerprints that tie a cache to the exact model, tokenizer and data that produced it.

Also where a ``--model`` value is turned into something loadable, failing at once rather than after the hub
client's network retries (about 50 s without a network):

- an existing directory is used as is (``~`` is expanded);
- a value that can only be a path is refused with "no such model directory", before any hub call: it starts
  with ``.``, ``/`` or ``~``, holds a backslash or more than one ``/``, is not a valid hub id, names a file, or
  its first component is a local directory (``models/nope`` where ``models/`` exists);
- anything else is a hub id. Offline (``HF_HUB_OFFLINE``), it must already be in the local Hugging Face cache,
  or the error says how to fetch it; online, it is downloaded as usual.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefpipe.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def _only_a_path(model: str) -> bool:
    """True when `model` cannot be meant as a hub id (`owner/name` or `name`)."""
    from huggingface_hub.utils import validate_repo_id

    if model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1:
        return True
    try:
        validate_repo_id(model)
    except ValueError:  # HFValidationError
        return True
    # `models/nope` with a local `models/` directory is a mistyped path, not the hub user "models".
    return "/" in model and Path(model.split("/")[0]).is_dir()


def _hub_offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)  # set from HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE


def _cached_snapshot(model: str) -> Path | None:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - every flavour of "not in the cache" means the same here
        return None


def model_ref(model: str) -> str:
    """`model` as `from_pretrained` should get it: a local directory, or a hub id that can be loaded.

    Raises `UserError` without touching the network for a missing path and, offline, for an uncached hub id.
    """
    p = Path(model).expanduser()
    if p.is_dir():
        return str(p)
    if p.exists():
        raise UserError("not a model directory (this is a file; give the directory that holds config.json)",
                        file=model)
    if _only_a_path(model):
        raise UserError("no such model directory", file=model)
    if _hub_offline() and _cached_snapshot(model) is None:
        raise UserError(f"no such model directory, and the hub model is not in the local Hugging Face cache "
                        f"(offline: HF_HUB_OFFLINE is set); fetch it with `hf download {model}` "
                        f"(older huggingface_hub: `huggingface-cli download {model}`)", file=model)
    return model


def resolve_model_dir(model: str) -> Path:
    """A local directory as is; a hub id through the local Hugging Face cache (downloading if allowed)."""
    ref = model_ref(model)
    if Path(ref).is_dir():
        return Path(ref)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(ref))
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's id being wrong or the network down
        raise UserError(f"not a local model directory, and the hub lookup failed: {' '.join(str(e).split())}",
                        file=model)


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(model: str | Path) -> bool:
    """A PEFT adapter directory: `adapter_config.json` and no full model (`config.json`) beside it."""
    p = Path(model).expanduser()
    return (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def adapter_base(adapter_dir: str | Path) -> str:
    """The `base_model_name_or_path` of an adapter directory: a directory (as written, else relative to the
    adapter directory) or a hub id."""
    f = Path(adapter_dir).expanduser() / ADAPTER_CONFIG
    try:
        base = json.loads(f.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"not a readable PEFT adapter config ({e})", file=str(f))
    if not isinstance(base, str) or not base:
        raise UserError("the adapter names no base model (base_model_name_or_path)", file=str(f))
    if not Path(base).expanduser().is_dir() and (f.parent / base).is_dir():
        return str(f.parent / base)
    return base


def model_fingerprint(model: str | Path) -> str:
    """sha256 over config.json and every weights file's bytes (names sorted).

    Hashing full weights costs a few seconds per GB; it is the only fingerprint that cannot be fooled by a
    re-saved or fine-tuned checkpoint with the same shapes. Each process hashes a model once: the result is kept
    per (directory, file names, sizes, modification times), so a rewritten file is hashed again. A PEFT adapter
    directory's fingerprint covers its adapter_config.json and adapter weights and its base model's fingerprint.
    """
    d = resolve_model_dir(str(model))
    if is_adapter_dir(d):
        files = sorted(f for f in d.iterdir() if f.name == ADAPTER_CONFIG
                       or (f.name.startswith("adapter_model") and f.name.endswith(WEIGHT_SUFFIXES)))
        return _sha({"adapter": _memo_hash(d, files), "base": model_fingerprint(adapter_base(d))})
    files = sorted(f for f in d.iterdir() if f.name == "config.json" or f.name.endswith(WEIGHT_SUFFIXES))
    return _memo_hash(d, files)


def _memo_hash(d: Path, files: list[Path]) -> str:
    stats = [f.stat() for f in files]
    memo_key = (str(d.resolve()), tuple((f.name, s.st_size, s.st_mtime_ns) for f, s in zip(files, stats)))
    if memo_key not in _MODEL_FINGERPRINTS:
        _MODEL_FINGERPRINTS[memo_key] = _hash_files(files)
    return _MODEL_FINGERPRINTS[memo_key]


_MODEL_FINGERPRINTS: dict[tuple, str] = {}


def _hash_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            d = hashlib.sha256()  # hashlib.file_digest is 3.11+
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                d.update(chunk)
            h.update(d.digest())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict:
    """Per-component hashes plus a combined one, so a mismatch can say *what* differs."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    pipeline = None
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("model", None)  # the vocabulary is hashed on its own below
        spec.pop("added_tokens", None)  # so are the special tokens
        pipeline = spec
    parts = {
        "vocab": _sha(sorted(tokenizer.get_vocab().items())),
        "special_tokens": _sha({"map": tokenizer.special_tokens_map, "bos": tokenizer.bos_token_id,
                                "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                                "added": sorted(str(t) for t in tokenizer.all_special_tokens)}),
        "chat_template": _sha(getattr(tokenizer, "chat_template", None)),
        "pipeline": _sha(pipeline),
    }
    return {"fingerprint": _sha(parts), "parts": parts}


def tokenizer_diff(expected: dict, actual: dict) -> list[str]:
    """Names of tokenizer components whose hashes differ."""
    e, a = expected.get("parts", {}), actual.get("parts", {})
    return sorted(k for k in set(e) | set(a) if e.get(k) != a.get(k))
