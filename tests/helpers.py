"""Helpers the tests share: small preference datasets, JSONL files, the one-line error check. Imported as a normal
module (`from helpers import ...`; pytest puts `tests/` on the path through pyproject's `pythonpath`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the cat sat on a mat while seven quick foxes jumped over lazy dogs and birds sang songs of "
         "summer rain in gardens full of roses").split()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def make_pairs(n: int, seed: int = 0, max_words: int = 30) -> list[dict]:
    """Plain-text pairs with skewed, varied lengths (so batches mix short and long rows)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({
            "prompt": f"Q{i}: " + random_text(rng, rng.randint(1, max_words // 2)),
            "chosen": random_text(rng, rng.randint(1, max_words)),
            "rejected": random_text(rng, rng.randint(1, max_words)) + " no",
        })
    return rows


def one_line_error(result, *needles):
    """A CLI result that failed with one `prefpipe: error:` line (exit 2, no traceback) holding every needle."""
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("prefpipe: error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def make_unpaired(n: int, seed: int = 0, max_words: int = 30) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Q{i}: " + random_text(rng, rng.randint(1, max_words // 2)),
             "completion": random_text(rng, rng.randint(1, max_words)), "label": i % 3 != 0} for i in range(n)]


def make_sample(sample_index: int, completion_ids: list[int], reward: float | None = None, *, prompt_index: int = 0,
                completion: str | None = None, prompt="Q", row: dict | None = None):
    """A `prefpipe.generation.samples.Sample` of prompt `prompt_index` (row id `r<prompt_index>`); its completion
    text defaults to its ids written out."""
    from prefpipe.generation.samples import Sample
    return Sample(prompt_index=prompt_index, row_id=f"r{prompt_index}", sample_index=sample_index, prompt=prompt,
                  prompt_ids=[1], completion=" ".join(map(str, completion_ids)) if completion is None else completion,
                  completion_ids=list(completion_ids), finish_reason="stop", row=dict(row or {}), reward=reward)


def greedy_continuation(model, prompt_ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """Greedy decoding the slow way: a full forward over the whole sequence at every step (no KV cache, no
    batching, no padding), argmax of the last position, ending just after a stop id or at `max_new_tokens`."""
    import torch
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        while len(out) < max_new_tokens:
            t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            out.append(t)
            if t in stops:
                break
    return out


def vllm_python() -> str:
    """The vLLM environment's interpreter (PREFPIPE_VLLM_PYTHON, built by .ci/vllm-env.sh); the test skips without
    it, or fails under PREFPIPE_REQUIRE_VLLM=1 (CI), where a missing environment must not pass as a skip."""
    import os

    import pytest
    py = os.environ.get("PREFPIPE_VLLM_PYTHON")
    problem = None
    if not py:
        problem = "PREFPIPE_VLLM_PYTHON is not set (build the environment with .ci/vllm-env.sh)"
    elif not os.access(py, os.X_OK):
        problem = f"PREFPIPE_VLLM_PYTHON={py} is not an executable"
    if problem:
        if os.environ.get("PREFPIPE_REQUIRE_VLLM") == "1":
            pytest.fail(f"PREFPIPE_REQUIRE_VLLM=1 but {problem}")
        pytest.skip(problem)
    return py


def vllm_env() -> dict:
    """The environment a vLLM CLI subprocess runs in: this checkout first on the path, offline, a small CPU KV cache."""
    import os
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


# ---------------------------------------------------------------- Hugging Face datasets, built offline
# The three forms --data takes besides files (tests/data/test_hf_datasets.py, tests/test_input_matrix.py).

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_disk(tmp_path, train, test):
    """A `save_to_disk` directory with a train and a test split."""
    import datasets

    d = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(d))
    return str(d)


def make_repo(tmp_path, train, test):
    """A repository folder without a card: the split is in the file names (data/train-..., data/test-...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "repo"
    (d / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(train), d / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(test), d / "data" / "test-00000-of-00001.parquet")
    return str(d)


CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: rows/first.jsonl
  - split: test
    path: rows/second.jsonl
---
# prefs
"""


def make_hub(tmp_path, train, test, repo_id="acme/prefs"):
    """The hub cache as `hf download --repo-type dataset acme/prefs` leaves it, with JSON Lines and a card."""
    org, name = repo_id.split("/")
    root = tmp_path / "hf_home" / "hub" / f"datasets--{org}--{name}"
    snap = root / "snapshots" / COMMIT
    write_jsonl(snap / "rows" / "first.jsonl", train)
    write_jsonl(snap / "rows" / "second.jsonl", test)
    (snap / "README.md").write_text(CARD)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    return repo_id
