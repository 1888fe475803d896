"""aot sorts margins over the micro-batch (TRL's definition), so under torchrun its loss depends on --batch_size
only: 2 processes x batch 2 log the same loss as 1 process x batch 2 x 2 accumulation (the same two micro-batches
of the same global batch of 4: micro-batch k of process r holds rows [(k*world + r)*bs, ...) of the step's global
batch, see `micro_batches`), and a different one from 1 process x batch 4 (the 4 rows sorted together).

The data are chosen so that sorting can matter. A cache made from the policy itself gives step-1 margins equal to the
reference's, and sorting both lists in the same order pairs every row with itself; a cache from another random tiny
Llama on the usual test pairs does no better, because the response lengths set both models' margins (about -log V
per token) and so their order. Here every rejected response is its chosen one with the words shuffled (the same
tokens), and the cache comes from another random Llama (same tokenizer, init seed 1; --allow_reference_mismatch):
the two models' margins are then of a few nats and differently ordered. The data order's seed (3) is one whose first
global batch (rows 0, 3 | 2, 4) interleaves the two micro-batches' margins; with seed 0 (rows 4, 0 | 7, 3) one
micro-batch's margins all lie above the other's in both models, and the two definitions coincide. The test asserts
that they differ here."""

import random

import pytest

from helpers import random_text, write_jsonl
from train_fixtures import one_thread  # noqa: F401  (autouse)
from train_fixtures import cache, metrics, shared_dir, train
from test_train_dist import torchrun

ATOL = 1e-5
BETA = 0.5
SEED = 3


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory):
    from prefpipe.tiny import build_tiny
    rng = random.Random(5)
    rows = []
    for i in range(8):
        words = random_text(rng, 8).split()
        rows.append({"prompt": f"Q{i}: " + random_text(rng, 4), "chosen": " ".join(words),
                     "rejected": " ".join(rng.sample(words, len(words)))})
    data = write_jsonl(shared_dir(tmp_path_factory, "shuffled8.jsonl"), rows)
    other = build_tiny(tmp_path_factory.mktemp("tiny-llama-seed1"), seed=1)
    return cache(tmp_path_factory, other, data, "shuffled8-seed1-model")


def one_process(out, tiny_model, cache_dir, **kw):
    train(out, tiny_model, cache=cache_dir, loss_types=("aot",), betas=(BETA,), lr=1e-3, max_steps=2, seed=SEED,
          source_kw={"allow_reference_mismatch": True, "drift_rows": 0}, **kw)
    return metrics(out / f"aot-beta{BETA}")


@pytest.mark.slow
def test_ddp_aot_sorts_each_process_micro_batch(tmp_path, tiny_model, other_cache):
    proc = torchrun("--model", tiny_model, "--cache", other_cache, "--loss_type", "aot", "--beta", BETA,
                    "--batch_size", 2, "--lr", "1e-3", "--max_steps", 2, "--seed", SEED, "--warmup_ratio", 0,
                    "--lr_scheduler", "linear", "--allow_reference_mismatch", "--drift_rows", 0, "--dtype", "float32",
                    "--device", "cpu", "--no_progress", "--out", tmp_path / "ddp")
    assert "ddp on 2 process(es)" in proc.stderr
    ddp = metrics(tmp_path / "ddp" / f"aot-beta{BETA}")
    accum = one_process(tmp_path / "accum", tiny_model, other_cache, batch_size=2, grad_accum=2)
    whole = one_process(tmp_path / "whole", tiny_model, other_cache, batch_size=4)
    assert [r["examples"] for r in ddp] == [4, 4]  # the logged count is the global batch's
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in accum], abs=ATOL)
    # sorting the 4 rows together pairs the margins differently: these data make the two definitions differ
    assert abs(whole[0]["loss"] - ddp[0]["loss"]) > 1e-2
