"""`run_demo` end to end at a tiny size: every stage runs, the result and report are written, and a rerun reuses
the SFT model, the pairs and the precompute cache instead of rebuilding them."""

import json
from dataclasses import replace

import torch

from prefpipe.demo.run import DemoSettings, kto_desirable_weight, run_demo
from prefpipe.demo.pairs import PairSettings
from prefpipe.demo.sft import SFTSettings


def test_demo_runs_end_to_end_and_reuses_its_stages(tmp_path):
    torch.set_num_threads(1)
    s = DemoSettings(out=str(tmp_path / "demo"), seed=3, n_train=120, n_heldout=20, n_pair_questions=24, n_check=16,
                     sft=SFTSettings(steps=30, batch_size=16, warmup_steps=3, target_accuracy=0.99, check_every=15),
                     pairs=PairSettings(samples=4, pairs_per_question=2, batch_size=64),
                     loss_types=("dpo", "kto", "orpo"), betas=(1.0,), batch_size=8, device="cpu")
    first = []
    result = run_demo(s, log=first.append)
    out = tmp_path / "demo"
    assert set(result["accuracy"]) == {"reference", "dpo-beta1", "kto-beta1", "orpo"}
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    assert json.loads((out / "demo_result.json").read_text())["accuracy"] == result["accuracy"]
    for f in ("summary.md", "beta.png", "curves.png"):
        assert (out / "runs" / f).stat().st_size > 0
    # The tiny model never reaches 99%, so SFT runs its whole schedule; the check ran at steps 15 and 30.
    assert json.loads((out / "sft" / "sft_summary.json").read_text())["steps"] == 30
    pairs = [json.loads(x) for x in (out / "data" / "pairs.jsonl").read_text().splitlines()]
    kto = [json.loads(x) for x in (out / "data" / "kto.jsonl").read_text().splitlines()]
    assert len(pairs) == result["pairs"]["pairs"] > 0
    n_d = sum(k["label"] for k in kto)
    toml = (out / "run.toml").read_text()
    assert f"desirable_weight = {round((len(kto) - n_d) / n_d, 2)!r}" in toml
    assert kto_desirable_weight(out / "data" / "kto.jsonl") == round((len(kto) - n_d) / n_d, 2)

    assert "computing (no cache there yet)" in "\n".join(first)
    again = []
    rerun = run_demo(replace(s), log=again.append)
    text = "\n".join(again)
    assert "sft: reusing" in text and "pairs: reusing" in text
    assert "cache" in text and "computing" not in text  # the pipeline reused both precompute caches
    assert rerun["accuracy"]["reference"] == result["accuracy"]["reference"]
