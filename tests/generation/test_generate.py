"""`prefpipe generate` on the tiny model: sampled ids are what precompute scores, resume, determinism, the output
read as data (pairs and KTO view), and the refusals that come before a model loads."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from helpers import greedy_continuation, one_line_error, write_jsonl

JUDGE = '''
def length(prompt, completion, row):
    return float(len(completion))
'''


def _prompts(tmp_path, n=6):
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "answer": f"#### {2 * i}", "topic": "sums"}
            for i in range(n)]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


@pytest.fixture
def judged(tmp_path, monkeypatch):
    (tmp_path / "judge_mod.py").write_text(JUDGE)
    monkeypatch.chdir(tmp_path)
    return "python:judge_mod:length"


def _samples(out):
    return [pq.read_table(p).to_pylist() for p in sorted((out / "samples").glob("part-*.parquet"))]


def _rows(path):
    return pq.read_table(path).to_pylist()


def test_generate_defaults_then_precompute_scores_the_sampled_ids(run_cli, tiny_model, tiny_tokenizer, tmp_path,
                                                                   judged):
    data, out, cache = _prompts(tmp_path), tmp_path / "gen", tmp_path / "cache"
    r = run_cli("generate", "--model", tiny_model, "--data", data, "--out", out, "--reward", judged,
                "--max_new_tokens", "12")
    assert r.exit_code == 0, r.output
    samples = [s for part in _samples(out) for s in part]
    assert len(samples) == 6 * 8  # default --num_samples 8, nothing dropped
    eos = tiny_tokenizer.eos_token_id
    for s in samples:
        ids = s["completion_ids"]
        # Cut just after the first stop token, or at max_new_tokens without one.
        if s["finish_reason"] == "stop":
            assert ids[-1] in (eos, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"))
        else:
            assert len(ids) == 12 and eos not in ids
        assert s["reward"] == float(len(s["completion"]))
        assert json.loads(s["row"])["topic"] == "sums"  # other columns reach the judge
        # The prompt ids sampled from are the cache's prompt ids: BOS once, then the text.
        assert s["prompt_ids"] == [tiny_tokenizer.bos_token_id] + tiny_tokenizer(
            json.loads(s["prompt"]), add_special_tokens=False)["input_ids"]
    pairs = _rows(out / "pairs.parquet")
    assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    # A random model's samples rarely tokenize back to themselves: the case the ids exist for.
    changed = [s for s in samples if tiny_tokenizer(s["completion"], add_special_tokens=False)["input_ids"]
               != [t for t in s["completion_ids"] if t != eos]]
    assert changed, "no sample whose decode -> encode round trip differs; the test would prove nothing"

    r = run_cli("precompute", "--model", tiny_model, "--data", out, "--out", cache)
    assert r.exit_code == 0, r.output
    cached = {row["row_id"]: row for f in sorted(cache.glob("part-*.parquet")) for row in _rows(f)}
    assert len(cached) == len(pairs)
    for p in pairs:
        c = cached[p["row_id"]]
        assert c["prompt_ids"] == p["prompt_ids"]
        assert c["chosen_ids"] == p["chosen_ids"]  # no EOS added to a completion cut by max_new_tokens
        assert c["rejected_ids"] == p["rejected_ids"]


def test_kto_view_and_tokenizer_check(run_cli, tiny_model, tmp_path, judged):
    from prefpipe.tiny import build_model, build_tokenizer

    data, out = _prompts(tmp_path, 4), tmp_path / "gen"
    assert run_cli("generate", "--model", tiny_model, "--data", data, "--out", out, "--reward", judged,
                   "--max_new_tokens", "6", "--num_samples", "3", "--no_progress").exit_code == 0
    kto = _rows(out / "kto.parquet")
    r = run_cli("data", "check", out, "--model", tiny_model)
    assert r.exit_code == 0 and "a prefpipe generate output, its pairs" in r.output, r.output
    n_pairs = len(_rows(out / "pairs.parquet"))
    assert f"rows:       {n_pairs} read, {n_pairs} kept" in r.output
    r = run_cli("precompute", "--model", tiny_model, "--data", out, "--out", tmp_path / "kto-cache", "--kto")
    assert r.exit_code == 0, r.output
    cached = [row for f in sorted((tmp_path / "kto-cache").glob("part-*.parquet")) for row in _rows(f)]
    assert sorted(map(tuple, (c["completion_ids"] for c in cached))) == \
        sorted(map(tuple, (k["completion_ids"] for k in kto)))
    other = tmp_path / "other"
    build_model(other, build_tokenizer(other, vocab_size=300))
    r = run_cli("precompute", "--model", other, "--data", out, "--out", tmp_path / "c2")
    one_line_error(r, "generator's tokenizer")


def test_same_seed_same_samples_and_resume(run_cli, tiny_model, tmp_path, judged):
    data = _prompts(tmp_path, 5)
    args = ("--model", tiny_model, "--data", data, "--reward", judged, "--max_new_tokens", "8",
            "--num_samples", "4", "--part_rows", "2", "--no_progress")
    assert run_cli("generate", *args, "--out", tmp_path / "a").exit_code == 0
    assert run_cli("generate", *args, "--out", tmp_path / "b").exit_code == 0
    first = _samples(tmp_path / "a")
    assert first == _samples(tmp_path / "b")
    # Interrupted after part 0: the rerun samples parts 1 and 2 exactly as the whole run did.
    (tmp_path / "a" / "samples" / "part-00002.parquet").unlink()
    (tmp_path / "a" / "samples" / "part-00001.parquet").unlink()
    (tmp_path / "a" / "manifest.json").unlink()
    r = run_cli("generate", *args, "--out", tmp_path / "a")
    assert r.exit_code == 0 and "1 reused" in r.output
    assert _samples(tmp_path / "a") == first
    r = run_cli("generate", *args[:-1], "--seed", "1", "--no_progress", "--out", tmp_path / "a")
    one_line_error(r, "another generate run", "--overwrite")


def test_drop_truncated_counts(run_cli, tiny_model, tmp_path, judged):
    data, out = _prompts(tmp_path, 3), tmp_path / "gen"
    r = run_cli("generate", "--model", tiny_model, "--data", data, "--out", out, "--reward", judged,
                "--max_new_tokens", "2", "--num_samples", "4", "--drop_truncated", "--no_progress")
    assert r.exit_code == 0, r.output
    kept = [s for part in _samples(out) for s in part]
    assert all(s["finish_reason"] == "stop" for s in kept)
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    assert summary["sample_counts"].get("truncated_dropped", 0) + len(kept) + \
        summary["sample_counts"].get("empty_completion", 0) == 12


@pytest.mark.parametrize("args, needles", [
    (("--num_samples", "1"), ("--num_samples", "at least 2")),
    (("--max_new_tokens", "0"), ("--max_new_tokens",)),
    (("--reward", "python:nosuchmodule:f"), ("nosuchmodule",)),
    (("--reward", "model"), ("--reward_model",)),
])
def test_bad_options_one_line(run_cli, tiny_model, tmp_path, args, needles):
    r = run_cli("generate", "--model", tiny_model, "--data", _prompts(tmp_path), "--out", tmp_path / "o", *args)
    one_line_error(r, *needles)
    assert not (tmp_path / "o").exists()


def test_missing_gold_column_before_model(run_cli, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "answer": "#### 1"}, {"prompt": "yo"}])
    # The model does not exist: the gold column is checked before anything is loaded.
    r = run_cli("generate", "--model", tmp_path / "no-model", "--data", data, "--out", tmp_path / "o")
    one_line_error(r, "answer")
    assert "row 2" in r.output or ":2" in r.output


def test_reading_an_output_being_written_or_unfinished(run_cli, tiny_model, tmp_path, judged):
    from prefpipe.fileio import OutputLock

    data, out = _prompts(tmp_path, 2), tmp_path / "gen"
    assert run_cli("generate", "--model", tiny_model, "--data", data, "--out", out, "--reward", judged,
                   "--max_new_tokens", "4", "--num_samples", "2", "--no_progress").exit_code == 0
    with OutputLock(out, "--out"):  # as a generate command writing there holds it (flock: per open file)
        r = run_cli("precompute", "--model", tiny_model, "--data", out, "--out", tmp_path / "c")
        one_line_error(r, "being written")
    (out / "manifest.json").unlink()
    r = run_cli("precompute", "--model", tiny_model, "--data", out, "--out", tmp_path / "c")
    one_line_error(r, "incomplete")
    shutil.rmtree(out)


def test_a_judge_that_raises_stops_in_one_line_and_leaves_no_finished_output(run_cli, tiny_model, tmp_path,
                                                                             monkeypatch):
    (tmp_path / "bad_judge.py").write_text("def judge(prompt, completion, row):\n    raise KeyError('tests')\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "gen"
    r = run_cli("generate", "--model", tiny_model, "--data", _prompts(tmp_path, 2), "--out", out,
                "--reward", "python:bad_judge:judge", "--max_new_tokens", "3", "--num_samples", "2", "--no_progress")
    one_line_error(r, "KeyError", "sample")
    assert not (out / "manifest.json").exists() and not list((out / "samples").glob("*.parquet"))


def test_samples_of_counts_empty_and_truncated(tiny_tokenizer):
    from collections import Counter

    from prefpipe.data.formats import Record
    from prefpipe.generation.parts import _samples_of

    eos = tiny_tokenizer.eos_token_id
    word = tiny_tokenizer("hello", add_special_tokens=False)["input_ids"]
    rec = Record("r0", "p.jsonl", 1, "Say hi", extra={"prompt": "Say hi"})
    gens = [[([eos], "stop"), (word + [eos], "stop"), (word + word, "length")]]
    for drop, kept in ((False, 2), (True, 1)):
        counts = Counter()
        got = _samples_of([rec], [[1, 2]], gens, counts, drop, tiny_tokenizer, first=4)
        assert len(got) == kept and counts["empty_completion"] == 1
        assert counts["truncated_dropped" if drop else "truncated_kept"] == 1 and counts["stopped"] == 1
        assert [s.sample_index for s in got] == [1, 2][:kept] and got[0].prompt_index == 4
        assert got[0].completion_ids == word + [eos] and got[0].completion == "hello"


def test_greedy_gives_every_sample_the_greedy_completion(tiny_model, tiny_lm, tiny_tokenizer):
    from prefpipe.generation.config import SamplingSettings
    from prefpipe.generation.hf_sampler import HfGenerator

    prompts = [tiny_tokenizer("Hello there")["input_ids"], tiny_tokenizer("A much longer prompt, really")["input_ids"]]
    gen = HfGenerator(tiny_lm, tiny_tokenizer, SamplingSettings(num_samples=3, temperature=0.0, max_new_tokens=5),
                      batch_size=8)
    got = gen.generate(prompts, seed=0)
    for p, comps in zip(prompts, got):  # a batch with left padding, against one unpadded prompt at a time
        want = greedy_continuation(tiny_lm, p, 5, gen.stops)
        assert comps == [(want, "stop" if want[-1] in gen.stops else "length")] * 3

def test_greedy_samples_are_the_greedy_continuation(run_cli, tiny_model, tiny_lm, tiny_tokenizer, tmp_path, judged):
    # transformers refuses num_return_sequences > 1 without sampling: greedy K samples are one decode, repeated.
    data, out = _prompts(tmp_path, 4), tmp_path / "gen"
    r = run_cli("generate", "--model", tiny_model, "--data", data, "--out", out, "--reward", judged,
                "--temperature", "0", "--num_samples", "3", "--max_new_tokens", "10", "--no_progress")
    assert r.exit_code == 0, r.output
    samples = [s for part in _samples(out) for s in part]
    assert sorted({s["prompt_index"] for s in samples}) == [0, 1, 2, 3]
    stops = {tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for s in samples:
        assert s["completion_ids"] == greedy_continuation(tiny_lm, s["prompt_ids"], 10, stops)
    assert len(samples) == 12 - json.loads((out / "manifest.json").read_text())["summary"]["sample_counts"].get(
        "empty_completion", 0)


def test_a_models_own_sampling_defaults_do_not_apply(tiny_model, tiny_tokenizer, tmp_path):
    """A generation_config.json with top_k and a repetition penalty (as Qwen ships) leaves the samples unchanged:
    only prefpipe's settings shape the distribution sampled."""
    import shutil

    from transformers import GenerationConfig

    from prefpipe.generation.config import SamplingSettings
    from prefpipe.generation.hf_sampler import HfGenerator
    from prefpipe.modeling import load_model

    other = tmp_path / "with-defaults"
    shutil.copytree(tiny_model, other)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, top_k=3, temperature=0.3,
                     repetition_penalty=1.5).save_pretrained(other)
    prompts = [tiny_tokenizer("Hello there")["input_ids"]]
    s = SamplingSettings(num_samples=6, temperature=1.0, max_new_tokens=12)
    plain = HfGenerator(load_model(str(tiny_model)), tiny_tokenizer, s, 8).generate(prompts, seed=5)
    shipped = HfGenerator(load_model(str(other)), tiny_tokenizer, s, 8).generate(prompts, seed=5)
    assert plain == shipped
    assert len({tuple(ids) for ids, _ in plain[0]}) > 1  # sampled, not greedy
