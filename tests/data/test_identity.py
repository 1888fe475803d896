"""prefpipe.data.identity: what must match to reuse or resume a cache, the wording of a difference, and the
once-per-process model fingerprint."""

from __future__ import annotations

import hashlib
import os

from prefpipe.data import fingerprint, identity


def meta(**over) -> dict:
    """Cache metadata as precompute writes it (only the keys identity reads, plus some it must ignore)."""
    m = {"schema_version": 1, "prefpipe_version": "0.1.0", "kind": "paired", "has_reference": True,
         "created_at": "2024-01-01T00:00:00+00:00", "counts": {"rows_written": 3},
         "model": {"path": "/somewhere/sft", "fingerprint": "a" * 64},
         "tokenizer": {"fingerprint": "b" * 64, "parts": {}},
         "tokenization": {"max_length": 96, "max_prompt_length": 48},
         "data": {"path": "/somewhere/pairs.jsonl", "fingerprint": "c" * 64, "format": "prompt_chosen_rejected",
                  "columns": {"prompt": "prompt", "chosen": "chosen"}, "turn_marker": "\n\n"},
         "backend": {"name": "hf", "version": "5.0", "torch": "2.13", "dtype": "float32", "device": "cpu"},
         "layout": {"part_rows": 4}}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(m.get(k), dict):
            m[k] = {**m[k], **v}
        else:
            m[k] = v
    return m


def test_paths_times_counts_and_engine_versions_are_not_identity():
    a = identity.identity_of(meta())
    b = identity.identity_of(meta(model={"path": "/elsewhere"}, data={"path": "/x.jsonl"}, created_at="later",
                                  counts={}, backend={"version": "6.0", "torch": "3.0", "device": "cuda"}))
    assert identity.differences(a, b, resume=True) == []


def test_backend_dtype_and_part_rows_matter_only_for_resume():
    a = identity.identity_of(meta())
    b = identity.identity_of(meta(backend={"name": "vllm", "dtype": "bfloat16"}, layout={"part_rows": 8},
                                  prefpipe_version="0.2.0"))
    assert identity.differences(a, b) == []
    assert identity.differences(a, b, resume=True) == [
        "backend differs (cache vllm, now hf)", "dtype differs (cache bfloat16, now float32)",
        "part_rows differs (cache 8, now 4)", "prefpipe version differs (cache 0.2.0, now 0.1.0)"]


def test_a_quantized_reference_does_not_resume_an_unquantized_cache():
    """`--load_in_4bit` scores with NF4 weights: its parts must not be stitched to full-precision ones; a finished
    cache still serves (the step-0 drift check measures the numerics), like another dtype."""
    plain = identity.identity_of(meta())
    nf4 = identity.identity_of(meta(backend={"quantization": "nf4"}))
    assert identity.differences(plain, nf4) == []
    assert identity.differences(plain, nf4, resume=True) == ["dtype differs (cache float32+nf4, now float32)"]
    assert identity.engine_dtype("bfloat16", None) == "bfloat16"  # what caches recorded before quantization


def test_each_reuse_key_is_worded():
    now = identity.identity_of(meta())
    cases = {
        "model": (meta(model={"fingerprint": "d" * 64}), f"model fingerprint differs (cache {'d' * 12}, now "
                                                         f"{'a' * 12})"),
        "tokenizer": (meta(tokenizer={"fingerprint": "e" * 64}), "tokenizer fingerprint differs"),
        "tokenization": (meta(tokenization={"max_length": 80, "max_prompt_length": 48}),
                         "tokenization settings differ (max_length: cache 80, now 96)"),
        "data": (meta(data={"fingerprint": "f" * 64}), "data fingerprint differs"),
        "columns": (meta(data={"columns": {"prompt": "question", "chosen": "chosen"}}),
                    "column mapping differs (prompt: cache 'question', now 'prompt')"),
        "turn_marker": (meta(data={"turn_marker": "###"}), "turn marker differs"),
        "kind": (meta(kind="unpaired"), "it holds KTO examples, this run needs pairs"),
        "has_reference": (meta(has_reference=False), "it has no reference log-probs"),
    }
    for key, (old, words) in cases.items():
        diff = identity.differences(now, identity.identity_of(old))
        assert len(diff) == 1 and diff[0].startswith(words), (key, diff)


def test_key_names_the_reuse_identity():
    a = identity.reuse(identity.identity_of(meta()))
    assert identity.key(a) == identity.key(identity.reuse(identity.identity_of(meta(backend={"dtype": "bf16"}))))
    assert identity.key(a) != identity.key(identity.reuse(identity.identity_of(meta(tokenization={"max_length": 1}))))
    assert len(identity.key(a)) == 64 and int(identity.key(a), 16) >= 0


def test_model_fingerprint_hashes_once_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "_MODEL_FINGERPRINTS", {})
    (tmp_path / "config.json").write_bytes(b'{"a": 1}')
    (tmp_path / "model.safetensors").write_bytes(b"weights-1")
    (tmp_path / "tokenizer.json").write_bytes(b"not hashed")

    def by_hand():
        h = hashlib.sha256()
        for name in ("config.json", "model.safetensors"):
            h.update(name.encode() + b"\0" + hashlib.sha256((tmp_path / name).read_bytes()).digest())
        return h.hexdigest()

    calls = []
    real = fingerprint._hash_files
    monkeypatch.setattr(fingerprint, "_hash_files", lambda files: calls.append(1) or real(files))
    first = fingerprint.model_fingerprint(tmp_path)
    assert first == by_hand() and fingerprint.model_fingerprint(str(tmp_path)) == first and len(calls) == 1
    st = (tmp_path / "model.safetensors").stat()
    (tmp_path / "model.safetensors").write_bytes(b"weights-2")  # same size, other bytes
    os.utime(tmp_path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = fingerprint.model_fingerprint(tmp_path)
    assert second == by_hand() != first and len(calls) == 2
