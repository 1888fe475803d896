"""Shared fixtures: tiny offline models and small preference datasets. Nothing here touches the network."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Directory with a byte-level BPE tokenizer (chat template emits BOS) and a random 2-layer Llama."""
    from prefpipe.tiny import build_tiny
    return build_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model):
    from prefpipe.modeling import load_model
    return load_model(str(tiny_model)).eval()


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", make_pairs(24))


@pytest.fixture
def run_cli():
    """Invoke the real `prefpipe` CLI in-process; returns click's Result (exit_code, output, stderr)."""
    from click.testing import CliRunner

    from prefpipe.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return run
