"""Every input form through every command that reads data, each with its default options.

The forms: JSON Lines, gzipped JSON Lines, a JSON array, Parquet, a directory, a glob, a `save_to_disk` directory,
a dataset repository folder and a cached hub id (the last three built offline by helpers.py, as for
tests/data/test_hf_datasets.py).
The commands: `data check`, `precompute` (and `eval` of the cache it writes: eval's preference form reads a cache),
`train --data`, `pipeline` and `generate` (which reads the same rows as prompts), each run in-process as a user runs it: no --no_progress, so the progress bars (tqdm,
written to stderr whether or not it is a terminal) and the row counting behind their totals run too. Each form
holds the same 6 pairs; every command must see all 6.
"""

import gzip
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_disk, make_hub, make_pairs, make_repo, write_jsonl

pytest.importorskip("datasets")

# Each row also carries a GSM8K-style gold answer, which `generate`'s default judge reads (the other commands
# ignore columns they do not use).
ROWS = [{**r, "answer": f"#### {i}"} for i, r in enumerate(make_pairs(6, seed=11, max_words=12))]
HELD_OUT = make_pairs(2, seed=12, max_words=12)  # the other split of the HF forms: never read by default
FORMS = ("jsonl", "jsonl.gz", "json", "parquet", "directory", "glob", "save_to_disk", "repo_folder", "hub_id")


def _write_forms(root) -> dict[str, str]:
    lines = "".join(json.dumps(r) + "\n" for r in ROWS)
    forms = {"jsonl": str(write_jsonl(root / "f" / "pairs.jsonl", ROWS))}
    (root / "f" / "pairs.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    forms["jsonl.gz"] = str(root / "f" / "pairs.jsonl.gz")
    (root / "f" / "pairs.json").write_text(json.dumps(ROWS, indent=2))
    forms["json"] = str(root / "f" / "pairs.json")
    pq.write_table(pa.Table.from_pylist(ROWS), root / "f" / "pairs.parquet")
    forms["parquet"] = str(root / "f" / "pairs.parquet")
    write_jsonl(root / "dir" / "a.jsonl", ROWS[:4])
    (root / "dir" / "sub").mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[4:]), root / "dir" / "sub" / "b.parquet")
    forms["directory"] = str(root / "dir")
    for i in range(3):
        write_jsonl(root / "glob" / f"part-{i}.jsonl", ROWS[2 * i:2 * i + 2])
    forms["glob"] = str(root / "glob" / "part-*.jsonl")
    forms["save_to_disk"] = make_disk(root, ROWS, HELD_OUT)
    forms["repo_folder"] = make_repo(root, ROWS, HELD_OUT)
    forms["hub_id"] = make_hub(root, ROWS, HELD_OUT)
    return forms


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The 9 forms, built once; a private offline Hugging Face home for the module (hub id and datasets cache)."""
    root = tmp_path_factory.mktemp("forms")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_HOME", root / "hf_home"), ("HF_HUB_CACHE", root / "hf_home" / "hub"),
                            ("HF_DATASETS_CACHE", root / "hf_home" / "datasets"), ("HF_HUB_OFFLINE", "1"),
                            ("HF_DATASETS_OFFLINE", "1")):
            mp.setenv(name, str(value))
        yield _write_forms(root)


def _ok(result):
    assert result.exit_code == 0, (result.output, result.stderr)
    return result


@pytest.mark.parametrize("form", FORMS)
def test_data_check(forms, form, tiny_model, run_cli):
    r = _ok(run_cli("data", "check", forms[form], "--model", tiny_model))
    assert "rows:       6 read, 6 kept, 0 skipped" in r.output
    assert "format:     paired" in r.output


@pytest.mark.parametrize("form", FORMS)
def test_precompute_with_its_bar_then_eval_of_the_cache(forms, form, tiny_model, run_cli, tmp_path):
    cache = tmp_path / "cache"
    r = _ok(run_cli("precompute", "--model", tiny_model, "--data", forms[form], "--out", cache))
    assert re.search(r"precompute: 100%.* 6/6 ", r.stderr), r.stderr  # the bar, with its total
    assert "rows:     6 read, 6 kept, 6 rows written" in r.output
    r = _ok(run_cli("eval", "--model", tiny_model, "--cache", cache, "--beta", "0.1", "--out", tmp_path / "eval"))
    # The reference model against its own cache: every pair ties.
    assert "held-out reward accuracy 0.0000 (0 of 6 pairs strictly preferred)" in r.output
    assert "all 6 pairs tie" in r.output


@pytest.mark.parametrize("form", FORMS)
def test_train_with_data(forms, form, tiny_model, run_cli, tmp_path):
    r = _ok(run_cli("train", "--model", tiny_model, "--data", forms[form], "--loss_type", "orpo",
                    "--out", tmp_path / "runs", "--max_steps", "1", "--batch_size", "2"))
    assert "data: 6 rows read" in r.output and ", 6 kept, 0 skipped" in r.output
    assert re.search(r"orpo: 100%.* 1/1 ", r.stderr), r.stderr  # the training bar


@pytest.mark.parametrize("form", FORMS)
def test_pipeline(forms, form, tiny_model, run_cli, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tiny_model}"\ndata = "{forms[form]}"\nruns_dir = "runs"\nloss_type = ["dpo"]\n'
                    "beta = [0.1]\n[train]\nmax_steps = 1\nbatch_size = 2\n")
    r = _ok(run_cli("pipeline", "--config", toml))
    assert re.search(r"precompute: 100%.* 6/6 ", r.stderr), r.stderr
    summary = json.loads((tmp_path / "runs" / "pipeline.json").read_text())
    assert summary["caches"]["paired"]["action"] == "compute"
    assert [run["dir"] for run in summary["runs"]] == ["dpo-beta0.1"]


@pytest.mark.parametrize("form", FORMS)
def test_generate_reads_every_form_as_prompts(forms, form, tiny_model, run_cli, tmp_path):
    # JSON Lines with every default (256 new tokens); the other forms differ only in how rows are read, so their
    # completions are kept short to keep the module's time down.
    k = 8 if form == "jsonl" else 2
    short = () if form == "jsonl" else ("--max_new_tokens", "8", "--num_samples", "2")
    r = _ok(run_cli("generate", "--model", tiny_model, "--data", forms[form], "--out", tmp_path / "gen", *short))
    assert re.search(rf"generate: sampling x {k}: 100%.* 6/6 ", r.stderr), r.stderr
    assert f"generate: 6 prompts, {6 * k} samples kept" in r.output
    prompts = {json.loads(row["prompt"]) for row in pq.read_table(tmp_path / "gen" / "samples").to_pylist()}
    assert prompts == {row["prompt"] for row in ROWS}
