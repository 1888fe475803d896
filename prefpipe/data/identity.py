"""A cache's identity: the one place that says whether a cache matches a run, and how a difference is worded.

What a cache's identity is. A cache is identified by what its token ids and reference log-probs *mean*: the model
(sha256 of config.json and every weights file), the tokenizer (hashes of its vocabulary, special tokens, chat
template and pre/post-processing pipeline), the tokenization settings (max_length, max_prompt_length and the
truncation rules), the data (sha256 of its bytes) with its column mapping, the turn marker, the kind (pairs, or
KTO examples with pinned partners), whether it holds reference log-probs and whether it holds them per token
(`--per_token`: a cache without them cannot serve LD-DPO, and one with them costs more disk). A finished cache is **reused** when
all of these equal the run's. Backend, dtype and batch size are not part of it: they change the numerics of the
reference log-probs (which `prefpipe precompute --verify` and training's step-0 drift check measure), not what
they mean. An unfinished cache (parts but no manifest) is **resumed** only when, in addition, the backend, the
dtype (with the weight quantization, `--load_in_4bit`), `part_rows` and the prefpipe version match: its parts are stitched into one cache, so they must all come
from one run (blocks are cut by `part_rows`, and one engine and dtype score them all). The pipeline names its own
caches after their identity (`RUNS_DIR/cache-<12 hex>`), so a changed setting builds a new cache next to the old one.

Every check goes through here: the plan of phase one (prefpipe.precompute.plan: the expected identity, from the
run metadata it builds, and the reuse/resume decision precompute and the pipeline share), training's
tokenizer and model checks, verify, and eval.
"""

from __future__ import annotations

import hashlib
import json

from prefpipe.data.fingerprint import model_fingerprint, tokenizer_diff, tokenizer_fingerprint

# Compared to reuse a finished cache, in the order differences are reported.
# The cache format's version: part of the resume identity, and a manifest of another version is refused on read.
SCHEMA_VERSION = 1
REUSE_KEYS = ("model", "tokenizer", "tokenization", "data", "columns", "turn_marker", "kind", "has_reference",
              "per_token")
# Compared, on top of REUSE_KEYS, to resume an unfinished one.
RESUME_KEYS = REUSE_KEYS + ("backend", "dtype", "part_rows", "prefpipe_version", "schema_version")

_NAMES = {"columns": "column mapping", "turn_marker": "turn marker", "part_rows": "part_rows",
          "prefpipe_version": "prefpipe version", "schema_version": "cache schema version"}


# Where each identity key lives in a cache's metadata (dotted), so a difference between two metadata dicts can name
# the field a person would edit. `dtype` is read together with `backend.quantization` (see engine_dtype).
FIELDS = {"model": "model.fingerprint", "tokenizer": "tokenizer.fingerprint", "tokenization": "tokenization",
          "data": "data.fingerprint", "columns": "data.columns", "turn_marker": "data.turn_marker", "kind": "kind",
          "has_reference": "has_reference", "per_token": "per_token", "backend": "backend.name",
          "dtype": "backend.dtype", "part_rows": "layout.part_rows", "prefpipe_version": "prefpipe_version",
          "schema_version": "schema_version"}


def _field(meta: dict, dotted: str):
    for name in dotted.split("."):
        meta = meta.get(name) if isinstance(meta, dict) else None
    return meta


def identity_of(meta: dict) -> dict:
    """The resume-level identity recorded in a cache's (or a part's) metadata; `reuse(...)` narrows it."""
    out = {k: _field(meta, f) for k, f in FIELDS.items()}
    out["has_reference"] = meta.get("has_reference", True)
    out["per_token"] = bool(out["per_token"])
    out["dtype"] = engine_dtype(out["dtype"], _field(meta, "backend.quantization"))
    return out


def edited_field(manifest_meta: dict, part_meta: dict) -> tuple[str, object, object] | None:
    """The first identity field in which a manifest's metadata differs from a part's (which the manifest was
    written from): (dotted field, manifest's value, part's value), or None when their identities agree. A
    dict-valued field (tokenization, data.columns) is named down to the key that differs."""
    a, b = identity_of(manifest_meta), identity_of(part_meta)
    for k in RESUME_KEYS:
        if a[k] == b[k]:
            continue
        field = FIELDS[k]
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            sub = sorted(x for x in set(a[k]) | set(b[k]) if a[k].get(x) != b[k].get(x))[0]
            return f"{field}.{sub}", a[k].get(sub), b[k].get(sub)
        if k == "dtype" and _field(manifest_meta, field) == _field(part_meta, field):
            field = "backend.quantization"
            return field, _field(manifest_meta, field), _field(part_meta, field)
        return field, a[k], b[k]
    return None


def engine_dtype(dtype: str | None, quantization: str | None) -> str | None:
    """The numerics a backend scored in: its dtype, plus the weight quantization when there is one (a 4-bit NF4
    reference scores differently from the same weights unquantized, so the parts of one cache must not mix
    them). Unquantized engines keep the plain dtype, as caches have always recorded it."""
    return f"{dtype}+{quantization}" if dtype and quantization else dtype


def reuse(identity: dict) -> dict:
    return {k: identity.get(k) for k in REUSE_KEYS}


def key(identity: dict) -> str:
    """A stable hex digest of an identity (of `reuse(...)` for cache directory names). `per_token` counts only
    when true, so caches made before it existed keep their names (and their manifests' part identities)."""
    if not identity.get("per_token"):
        identity = {k: v for k, v in identity.items() if k != "per_token"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def differences(expected: dict, found: dict, *, resume: bool = False) -> list[str]:
    """Why a cache whose identity is `found` cannot serve a run expecting `expected`, one phrase per difference
    (empty when it can). `resume` adds the keys an unfinished cache must match too."""
    out = []
    for k in RESUME_KEYS if resume else REUSE_KEYS:
        a, b = found.get(k), expected.get(k)
        if a != b:
            out.append(_worded(k, a, b))
    return out


def _worded(k: str, a, b) -> str:
    if k == "tokenization" and isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(x for x in set(a) | set(b) if a.get(x) != b.get(x))
        return "tokenization settings differ (" + ", ".join(f"{x}: cache {a.get(x)}, now {b.get(x)}"
                                                            for x in keys) + ")"
    if k in ("model", "tokenizer", "data") and isinstance(a, str) and isinstance(b, str):
        return f"{k} fingerprint differs (cache {a[:12]}, now {b[:12]})"
    if k == "kind":
        def what(kind):
            return "KTO examples" if kind == "unpaired" else "pairs"
        return f"it holds {what(a)}, this run needs {what(b)}"
    if k == "has_reference":
        return "it has no reference log-probs" if not a else "it has reference log-probs, this run writes none"
    if k == "per_token":
        return ("it has no per-token reference log-probs (precompute --per_token), this run needs them" if not a
                else "it has per-token reference log-probs (--per_token), this run asks for none")
    if k == "columns" and isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(x for x in set(a) | set(b) if a.get(x) != b.get(x))
        return "column mapping differs (" + ", ".join(f"{x}: cache {a.get(x)!r}, now {b.get(x)!r}"
                                                      for x in keys) + ")"
    return f"{_NAMES.get(k, k)} differs (cache {a}, now {b})"


# ---------------------------------------------------------------- model and tokenizer, for train/verify/eval

def tokenizer_mismatch(meta: dict, tokenizer) -> list[str]:
    """Tokenizer components (vocab, special_tokens, chat_template, pipeline) that differ between the cache's
    recorded tokenizer and `tokenizer`; empty when they match."""
    recorded = meta.get("tokenizer") or {}
    actual = tokenizer_fingerprint(tokenizer)
    if recorded.get("fingerprint") == actual["fingerprint"]:
        return []
    return tokenizer_diff(recorded, actual) or ["fingerprint"]


def model_mismatch(meta: dict, model) -> str | None:
    """None when the cache's reference model is `model` (same weights fingerprint), else `model`'s fingerprint."""
    actual = model_fingerprint(model)
    return None if (meta.get("model") or {}).get("fingerprint") == actual else actual
