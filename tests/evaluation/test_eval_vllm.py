"""`prefpipe eval --gen --engine vllm` for real: the CPU build of vLLM in its own virtualenv (PREFPIPE_VLLM_PYTHON,
as in test_vllm.py), driven through the CLI, must produce the same greedy generations as transformers in-process."""

import json
import os
import subprocess

import pytest

from helpers import REPO, write_jsonl
from prefpipe.evaluation.generate import encode_prompts, hf_generate
from prefpipe import rundir

pytestmark = pytest.mark.vllm
QUESTIONS = ["what is 3 plus 4?", "The quick brown fox", "how are you?", "0 1 2 3 4 5", "Preference"]


def test_vllm_greedy_matches_transformers(tiny_model, tiny_lm, tiny_tokenizer, tmp_path):
    py = os.environ.get("PREFPIPE_VLLM_PYTHON")
    if not py or not os.access(py, os.X_OK):
        if os.environ.get("PREFPIPE_REQUIRE_VLLM") == "1":
            pytest.fail("PREFPIPE_REQUIRE_VLLM=1 but PREFPIPE_VLLM_PYTHON is not an executable")
        pytest.skip("PREFPIPE_VLLM_PYTHON is not set (build the environment with .ci/vllm-env.sh)")
    gsm = write_jsonl(tmp_path / "q.jsonl", [{"question": q, "answer": "#### 7"} for q in QUESTIONS])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    out = subprocess.run([py, "-m", "prefpipe", "eval", "--gen", str(gsm), "--model", str(tiny_model),
                          "--engine", "vllm", "--dtype", "float32", "--max_new_tokens", "12",
                          "--prompt_template", "Question: {question}\nAnswer:", "--out", str(tmp_path / "ev")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "ev" / rundir.EVAL_GEN).read_text())
    assert summary["engine"] == "vllm" and summary["n"] == len(QUESTIONS)
    got = [json.loads(x)["generation"] for x in (tmp_path / "ev" / "eval_gen.jsonl").read_text().splitlines()]
    ids = encode_prompts(tiny_tokenizer, [f"Question: {q}\nAnswer:" for q in QUESTIONS])
    expected = [g[0] for g in hf_generate(tiny_lm, tiny_tokenizer, ids, max_new_tokens=12)]
    assert got == expected
