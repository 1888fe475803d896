"""`rounds = N` in the pipeline: round r samples from round r-1's trained model, precomputes against the chosen
reference, trains one run, and a rerun redoes nothing; the key refusals come before any model loads."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from helpers import one_line_error, write_jsonl
from prefpipe.data.fingerprint import model_fingerprint
from prefpipe.data.cache import read_manifest

TOML = ('model = "{model}"\ndata = "prompts.jsonl"\nruns_dir = "runs"\nrounds = 2\n{extra}'
        'loss_type = ["1*dpo+1*sft"]\nbeta = [0.1]\ndevice = "cpu"\ndtype = "float32"\n'
        '[precompute]\nmax_length = 64\nmax_prompt_length = 32\n'
        '[train]\nmax_steps = 2\nbatch_size = 4\nlr = 1e-3\ndrift_rows = 4\n'
        '[eval]\ngen = "heldout.jsonl"\nmax_new_tokens = 4\n'
        '[generate]\nnum_samples = 3\nmax_new_tokens = 6\nreward = "python:judge_mod:length"\n')


def setup(tmp_path, model, extra=""):
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say {i} things"} for i in range(6)])
    write_jsonl(tmp_path / "heldout.jsonl", [{"question": f"{i} plus 1?", "answer": f"#### {i + 1}"}
                                            for i in range(3)])
    (tmp_path / "judge_mod.py").write_text("def length(prompt, completion, row):\n    return float(len(completion))\n")
    toml = tmp_path / "run.toml"
    toml.write_text(TOML.format(model=model, extra=extra))
    return toml


@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_two_rounds_then_a_rerun_that_redoes_nothing(run_cli, tiny_model, tmp_path, monkeypatch, reference):
    monkeypatch.chdir(tmp_path)
    extra = "" if reference == "initial" else 'reference_model = "previous"\n'
    toml = setup(tmp_path, tiny_model, extra)
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    runs = tmp_path / "runs"
    summary = json.loads((runs / "rounds.json").read_text())
    r1, r2 = summary["rounds"]
    final1 = r1["final_model"]
    # Round 2 samples from round 1's trained model ...
    gen2 = json.loads((runs / "round-2" / "samples" / "manifest.json").read_text())
    assert gen2["generator"]["path"] == final1
    assert gen2["generator"]["fingerprint"] == model_fingerprint(final1) != model_fingerprint(tiny_model)
    gen1 = json.loads((runs / "round-1" / "samples" / "manifest.json").read_text())
    assert gen1["generator"]["fingerprint"] == model_fingerprint(tiny_model)
    # ... and its cache's reference is the SFT model (initial) or that same starting policy (previous).
    cache2 = next(p for p in (runs / "round-2").iterdir() if p.name.startswith("cache-"))
    ref = tiny_model if reference == "initial" else final1
    assert read_manifest(cache2)["metadata"]["model"]["fingerprint"] == model_fingerprint(ref)
    table = (runs / "rounds.md").read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("| round | accuracy |")  # header, rule, round 0, two rounds
    evals = [json.loads((runs / "round-1" / r1["run"] / "eval_gen.json").read_text()),
             json.loads((runs / "round-2" / r2["run"] / "eval_gen.json").read_text())]
    assert [r1["eval"]["accuracy"], r2["eval"]["accuracy"]] == [e["accuracy"] for e in evals]
    stamps = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file() and p.name != ".prefpipe.lock"
              and p.name not in ("rounds.json", "rounds.md", "rounds.png")}
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    assert "round 1: reusing" in r.stderr and "round 2: reusing" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing sampled, scored or trained again
    if reference == "previous":
        return
    # Another sampling seed: both rounds are redone (round 2's policy changes with round 1).
    before = pq.read_table(runs / "round-1" / "samples" / "samples").to_pylist()
    r = run_cli("pipeline", "--config", toml, "--generate_seed", "7")
    assert r.exit_code == 0, r.output
    assert "round 1: redoing" in r.stderr and "round 2: redoing" in r.stderr
    assert pq.read_table(runs / "round-1" / "samples" / "samples").to_pylist() != before


def test_an_unfinished_round_resumes_or_is_redone_when_its_settings_changed(run_cli, tiny_model, tmp_path,
                                                                           monkeypatch):
    """An unfinished round (here: its round.json gone) resumes from its samples under the same settings; under
    other settings it is redone, where generate alone would refuse another run's parts and ask for --overwrite,
    a flag the pipeline does not have."""
    monkeypatch.chdir(tmp_path)
    toml = setup(tmp_path, tiny_model)
    toml.write_text(toml.read_text().replace("rounds = 2\n", "rounds = 1\n"))
    assert run_cli("pipeline", "--config", toml).exit_code == 0
    rd = tmp_path / "runs" / "round-1"
    first = pq.read_table(rd / "samples" / "samples").to_pylist()
    (rd / "round.json").unlink()
    r = run_cli("pipeline", "--config", toml)
    assert r.exit_code == 0, r.output
    assert "round 1: generating" in r.stderr and "redoing" not in r.stderr
    assert pq.read_table(rd / "samples" / "samples").to_pylist() == first
    (rd / "round.json").unlink()
    r = run_cli("pipeline", "--config", toml, "--generate_seed", "7")
    assert r.exit_code == 0, r.output
    assert "round 1: redoing" in r.stderr
    assert pq.read_table(rd / "samples" / "samples").to_pylist() != first


@pytest.mark.parametrize("extra, needles", [
    ("rounds = 0\n", ("rounds", "at least 1")),
])
def test_rounds_zero(run_cli, tiny_model, tmp_path, extra, needles):
    toml = setup(tmp_path, tiny_model)
    toml.write_text(toml.read_text().replace("rounds = 2\n", extra))
    one_line_error(run_cli("pipeline", "--config", toml), *needles)


def test_unknown_generate_key_and_generate_without_rounds(run_cli, tiny_model, tmp_path):
    toml = setup(tmp_path, tiny_model)
    text = toml.read_text()
    toml.write_text(text + "num_sample = 4\n")
    one_line_error(run_cli("pipeline", "--config", toml), "generate.num_sample", "num_samples")
    toml.write_text(text.replace("rounds = 2\n", "").replace('data = "prompts.jsonl"', 'data = "pairs.jsonl"'))
    one_line_error(run_cli("pipeline", "--config", toml), "generate.", "rounds")


def test_a_sweep_with_rounds_is_refused(run_cli, tiny_model, tmp_path):
    toml = setup(tmp_path, tiny_model)
    toml.write_text(toml.read_text().replace("beta = [0.1]", "beta = [0.1, 0.2]"))
    one_line_error(run_cli("pipeline", "--config", toml), "one run per round")
