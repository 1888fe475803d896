"""Shared fixtures: tiny offline models and small preference datasets. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# The helper modules' asserts report the values they compare, as a test module's do.
pytest.register_assert_rewrite("helpers", "train_fixtures")

from helpers import make_pairs, write_jsonl  # noqa: E402 - the helpers the fixtures below use


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
