"""A sliding window no shorter than the longest sequence changes nothing, so it is no reason to leave the block
path (prompt-once scoring, mask-free packed rows); a shorter one is, and says so in one `prefpipe: warning:` line.
prefpipe's warnings print as that one line; the CLI hides third-party deprecation notices, a library user does
not."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from prefpipe import attention
from prefpipe.packing import prompt_once_supported
from prefpipe.scoring import score_pairs, score_sequences


def mistral(out_dir, window: int):
    """A tiny random Mistral (sliding-window attention in every layer) with prefpipe's tiny tokenizer, saved."""
    from transformers import MistralConfig, MistralForCausalLM

    from prefpipe.tiny import build_tokenizer, save_random
    tok = build_tokenizer(out_dir)
    config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, head_dim=32, sliding_window=window,
                           max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    save_random(MistralForCausalLM, config, out_dir, tok, seed=0)
    return out_dir


def loaded(path):
    from prefpipe.modeling import load_model
    model = load_model(str(path), torch.float32, "cpu").eval()
    assert attention.uses_blocks(model)
    return model


def rows(n=6, seed=0):
    rng = random.Random(seed)
    draw = lambda k: [rng.randrange(4, 300) for _ in range(k)]  # noqa: E731
    return ([draw(rng.randint(6, 12)) for _ in range(n)], [draw(rng.randint(3, 10)) for _ in range(n)],
            [draw(rng.randint(3, 10)) for _ in range(n)])


def test_window_binds_only_below_the_longest_sequence():
    class C:
        sliding_window, layer_types = 2047, None
    assert not attention.window_binds(C, 1024)  # Phi-3 under --max_length 1024
    assert not attention.window_binds(C, 2047)  # q - k <= 2046 < 2047: every key in reach
    assert attention.window_binds(C, 2048)
    assert attention.window_binds(C, None)  # length unknown: assume it may bind
    C.sliding_window = None
    assert not attention.window_binds(C, 10**6)


def test_a_window_longer_than_max_length_keeps_prompt_once(tmp_path):
    model = loaded(mistral(tmp_path / "wide", window=64))
    assert prompt_once_supported(model, longest=64) is None
    prompts, firsts, seconds = rows()
    got = score_pairs(model, prompts, firsts, seconds, batch_tokens=10_000, per_token=True)
    want = score_sequences(model, prompts + prompts, firsts + seconds, batch_tokens=10_000, per_token=True)
    assert max(float((a - b).abs().max()) for a, b in zip(got.tokens, want.tokens)) < 1e-4


def test_a_window_shorter_than_max_length_falls_back_and_is_real(tmp_path):
    narrow = loaded(mistral(tmp_path / "narrow", window=6))
    why = prompt_once_supported(narrow, longest=64)
    assert why == "sliding-window attention (6-token window, shorter than --max_length 64)"
    # The window is real in this model: sequences longer than 6 tokens score differently without it.
    prompts, firsts, _ = rows()
    windowed = score_sequences(narrow, prompts, firsts, batch_tokens=10_000).sums
    narrow.config.sliding_window = None
    full = score_sequences(narrow, prompts, firsts, batch_tokens=10_000).sums
    assert max(abs(a - b) for a, b in zip(windowed, full)) > 1e-2


@pytest.mark.parametrize("window", [64, 6])
def test_packed_rows_match_padded_forwards_whatever_the_window(tmp_path, window):
    """Padding-free training: a window that cannot bind drops the mask; one that can keeps it."""
    from prefpipe.logprobs import pad_batch, packed_sequence_logprobs, sequence_logprobs
    model = loaded(mistral(tmp_path / "m", window=window))
    prompts, firsts, _ = rows(4, seed=1)
    seqs = [p + r for p, r in zip(prompts, firsts)]
    plens = torch.tensor([len(p) for p in prompts])
    ids, mask = pad_batch(seqs, 0)
    padded = sequence_logprobs(model, ids, mask, plens).sums
    packed = packed_sequence_logprobs(model, torch.tensor([sum(seqs, [])]), plens,
                                      torch.tensor([len(s) for s in seqs])).sums
    assert float((packed - padded).abs().max()) < 1e-4


def test_precompute_warns_in_one_line_only_when_the_window_binds(tmp_path, run_cli):
    """Phi-3's case (a 2047-token window, --max_length 64 here) keeps prompt-once without a word; a 16-token
    window falls back with one line on stderr: the real command, in a process of its own, as a user runs it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import make_pairs, write_jsonl
    from prefpipe.data.cache import read_cache
    from prefpipe.warn import PrefpipeWarning
    data = write_jsonl(tmp_path / "pairs.jsonl", make_pairs(6, seed=1))
    args = ["--data", data, "--max_length", "64", "--max_prompt_length", "24", "--device", "cpu", "--no_progress"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = run_cli("precompute", "--model", mistral(tmp_path / "wide", 2047), "--out", tmp_path / "c1", *args)
    assert r.exit_code == 0, r.output
    assert not [w for w in seen if issubclass(w.category, PrefpipeWarning)]
    assert read_cache(tmp_path / "c1").metadata["backend"]["prompt_once"] is True

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    p = subprocess.run([sys.executable, "-m", "prefpipe", "precompute", "--model", mistral(tmp_path / "narrow", 16),
                        "--out", tmp_path / "c2", *map(str, args)], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [
        "prefpipe: warning: --prompt_once: sliding-window attention (16-token window, shorter than --max_length "
        "64); scoring each response in its own forward instead"], p.stderr
    assert read_cache(tmp_path / "c2").metadata["backend"]["prompt_once"] is False


def test_prefpipe_warnings_are_one_line_and_third_party_noise_is_quiet_in_the_cli_only():
    from prefpipe.warn import PrefpipeWarning, quiet_third_party, warn
    assert warnings.formatwarning("m", PrefpipeWarning, "hf_backend.py", 54, "warn(...)") == "prefpipe: warning: m\n"
    assert "hf_backend.py:54" in warnings.formatwarning("m", UserWarning, "hf_backend.py", 54, "x")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("deprecated", FutureWarning, stacklevel=1)  # a library user sees it
        assert len(seen) == 1
        quiet_third_party()  # what the CLI does at start
        warnings.warn("deprecated", FutureWarning, stacklevel=1)
        warnings.warn("Failed to initialize NumPy: _ARRAY_API not found", UserWarning, stacklevel=1)
        warn("something to act on")
    assert [str(w.message) for w in seen] == ["deprecated", "something to act on"]
