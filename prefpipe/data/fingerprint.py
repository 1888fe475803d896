"""Fingerprints that tie a cache to the exact model and tokenizer that produced it (where a `--model` value
points is `prefpipe.model_paths`'s business)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prefpipe.model_paths import ADAPTER_CONFIG, adapter_base, is_adapter_dir, resolve_model_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


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
