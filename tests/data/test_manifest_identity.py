"""A hand-edited manifest is refused by every reader, in one line naming the manifest, the field and both values:
the manifest's identity fields must be those its parts were written with."""

from __future__ import annotations

from prefpipe.options import build

import json
import shutil

import polars as pl
import pytest

from helpers import make_pairs, one_line_error, write_jsonl
from prefpipe.data.cache import MANIFEST, read_cache
from prefpipe.errors import UserError
from train_fixtures import cache as precomputed

# (dotted field, the value written into the manifest, the value the parts were written with)
EDITS = [
    ("tokenization.max_length", 128, 96),
    ("model.fingerprint", "0" * 64, None),  # None: whatever precompute recorded
    ("tokenizer.fingerprint", "1" * 64, None),
    ("data.fingerprint", "2" * 64, None),
    ("data.columns.prompt", "question", "prompt"),
    ("backend.dtype", "bfloat16", "float32"),
    ("backend.quantization", "nf4", None),
    ("per_token", True, False),
    ("has_reference", False, True),
    ("kind", "unpaired", "paired"),
    ("layout.part_rows", 4, 5),
]


@pytest.fixture(scope="module")
def cache(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("manifest-identity")
    data = write_jsonl(d / "pairs.jsonl", make_pairs(10, seed=4))
    return data, precomputed(tmp_path_factory, tiny_model, data, "manifest-identity-cache", max_length=96,
                             max_prompt_length=32, part_rows=5)


def edited(cache, dest, field: str, value):
    shutil.copytree(cache, dest)
    manifest = json.loads((dest / MANIFEST).read_text())
    node = manifest["metadata"]
    *path, last = field.split(".")
    for name in path:
        node = node[name]
    true = node.get(last)
    node[last] = value
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return dest, true


def needles(dest, field, value, true):
    return [f"file {dest / MANIFEST}:", f"manifest field {field} is {json.dumps(value)}",
            f"its parts were written with {json.dumps(true)}"]


@pytest.mark.parametrize("field,value,true", EDITS, ids=[e[0] for e in EDITS])
def test_each_edited_identity_field_is_refused_by_every_reader(cache, tmp_path, run_cli, tiny_model, field, value,
                                                               true):
    from prefpipe.pipeline.config import resolve
    from prefpipe.pipeline.run import check_cache, expected_identity
    from prefpipe.precompute.verify import verify_cache

    data, cache = cache
    dest, recorded = edited(cache, tmp_path / "c", field, value)
    assert true is None or recorded == true  # the fixture wrote what the table says
    want = needles(dest, field, value, recorded)
    one_line_error(run_cli("inspect", dest), *want)
    one_line_error(run_cli("train", "--model", tiny_model, "--cache", dest, "--out", tmp_path / "run",
                           "--max_steps", "1", "--device", "cpu", "--no_progress"), *want)
    one_line_error(run_cli("eval", "--model", tiny_model, "--cache", dest, "--beta", "0.1", "--device", "cpu",
                           "--out", tmp_path / "ev"), *want)
    with pytest.raises(UserError) as e:
        verify_cache(str(dest), str(tiny_model), 2, device="cpu")
    assert all(n in str(e.value) for n in want), str(e.value)
    cfg = resolve(None, {"model": str(tiny_model), "data": str(data), "max_length": 96, "max_prompt_length": 32,
                         "part_rows": 5, "dtype": "float32", "device": "cpu"})
    check = check_cache(str(dest), expected_identity(cfg.settings.model, str(data), cfg, kto=False), recompute=False)
    assert check.action == "recompute" and all(n in check.reason for n in want[1:]), check.reason
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("final"))


def test_unedited_manifest_and_non_identity_edits_still_load(cache, tmp_path):
    _, cache = cache
    assert read_cache(cache).table.num_rows > 0
    dest, _ = edited(cache, tmp_path / "c", "model.path", "/moved/elsewhere")  # paths are not identity
    assert read_cache(dest).metadata["model"]["path"] == "/moved/elsewhere"


def test_parts_without_metadata_are_checked_against_the_recorded_digest(cache, tmp_path):
    """A part rewritten by polars has lost its metadata; the digest in the manifest still catches an edit."""
    _, cache = cache
    dest = tmp_path / "c"
    shutil.copytree(cache, dest)
    for p in dest.glob("part-*.parquet"):
        pl.read_parquet(p).write_parquet(p)
    assert read_cache(dest).table.num_rows > 0
    manifest = json.loads((dest / MANIFEST).read_text())
    manifest["metadata"]["tokenization"]["max_length"] = 128
    (dest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="manifest identity fields do not match the identity digest"):
        read_cache(dest)


def test_rerunning_the_precompute_rewrites_an_edited_manifest_from_its_parts(cache, tmp_path, tiny_model):
    """What the refusal advises: the same precompute reuses every part and writes the manifest again."""
    from prefpipe.precompute.run import PrecomputeConfig, run_precompute
    data, cache = cache
    dest, _ = edited(cache, tmp_path / "c", "tokenization.max_length", 128)
    with pytest.raises(UserError):
        read_cache(dest)
    summary = run_precompute(build(PrecomputeConfig, dict(model=str(tiny_model), data=str(data), out=str(dest), dtype="float32",
                                              device="cpu", progress=False, max_length=96, max_prompt_length=32,
                                              part_rows=5)))
    assert summary["parts_written"] == 0 and summary["parts_reused"] == summary["parts"]
    assert read_cache(dest).metadata["tokenization"]["max_length"] == 96
