"""`prefpipe eval --cache`: implicit-reward accuracy and margin against an independent float64 computation."""

import json

import pytest
import torch

from helpers import make_pairs, write_jsonl
from prefpipe.errors import UserError
from prefpipe.evaluation.evaluate import eval_preference, resolve_run
from train_fixtures import cache as precomputed
from prefpipe import rundir

BETA = 0.2


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("evalpref")
    data = write_jsonl(d / "pairs.jsonl", make_pairs(12, seed=11))
    cache = precomputed(tmp_path_factory, tiny_model, data, "evalpref-cache", max_length=96, max_prompt_length=48)
    # A policy: the reference with every weight matrix nudged, saved as a run directory like train's.
    from prefpipe.modeling import load_model
    run = d / "run"
    m = load_model(str(tiny_model))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    m.save_pretrained(str(run / rundir.FINAL))
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(run / rundir.FINAL))
    (run / rundir.RESULT).write_text(json.dumps({"name": "dpo-beta0.2", "loss_type": "dpo", "beta": BETA}))
    return d, cache, run


def float64_rewards(model_dir, cache_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected, by a plain float64 forward over full logits."""
    from transformers import AutoModelForCausalLM

    from prefpipe.data.cache import read_cache
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    t = read_cache(cache_dir).table
    out = {"chosen": [], "rejected": []}
    for p, c, r in zip(t.column("prompt_ids").to_pylist(), t.column("chosen_ids").to_pylist(),
                       t.column("rejected_ids").to_pylist()):
        for name, resp in (("chosen", c), ("rejected", r)):
            ids = torch.tensor([p + resp])
            with torch.no_grad():
                lp = m(input_ids=ids).logits[0].log_softmax(-1)
            out[name].append(sum(lp[len(p) + i - 1, tok].item() for i, tok in enumerate(resp)))
    return torch.tensor(out["chosen"], dtype=torch.float64), torch.tensor(out["rejected"], dtype=torch.float64)


def test_matches_float64_recomputation(setup, tiny_model):
    d, cache, run = setup
    ref_c, ref_r = float64_rewards(tiny_model, cache)
    pol_c, pol_r = float64_rewards(run / rundir.FINAL, cache)
    delta = (pol_c - ref_c) - (pol_r - ref_r)
    assert delta.abs().min() > 1e-3  # no near-ties, so the accuracy comparison is exact
    res = eval_preference(resolve_run(run), str(cache), device="cpu", dtype="float32")
    assert res["beta"] == BETA  # read from the run's result.json
    assert res["rows"] == 12
    assert res["acc"] == pytest.approx(float((delta > 0).double().mean()), abs=0)
    assert res["margin"] == pytest.approx(float(BETA * delta.mean()), abs=1e-4)
    assert res["r_chosen"] == pytest.approx(float(BETA * (pol_c - ref_c).mean()), abs=1e-4)
    assert 0 < res["acc"] < 1  # a nudged policy wins some pairs and loses others


def test_reference_against_itself_scores_zero(setup, tiny_model):
    d, cache, run = setup
    res = eval_preference(resolve_run(tiny_model), str(cache), beta=0.5, device="cpu", dtype="float32")
    assert res["acc"] == 0.0  # strict: a tie is not a win
    assert abs(res["margin"]) < 1e-5


def test_bad_inputs(setup, tiny_model, tmp_path):
    d, cache, run = setup
    with pytest.raises(UserError, match="pass --beta"):
        eval_preference(resolve_run(tiny_model), str(cache))
    with pytest.raises(UserError, match="neither a training run"):
        resolve_run(tmp_path)
    (tmp_path / rundir.RESULT).write_text("{}")
    with pytest.raises(UserError, match="no final model"):
        resolve_run(tmp_path)
    # A model with another tokenizer must not score these ids.
    from prefpipe.tiny import build_model, build_tokenizer
    other = tmp_path / "other"
    tok = build_tokenizer(other, corpus=["completely different text 123"], vocab_size=300)
    build_model(other, tok)
    with pytest.raises(UserError, match="another tokenizer"):
        eval_preference(resolve_run(other), str(cache), beta=0.1, device="cpu")


def test_cli_writes_eval_pref_json(setup, run_cli):
    d, cache, run = setup
    r = run_cli("eval", "--cache", cache, "--model", run, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "held-out reward accuracy" in r.output
    saved = json.loads((run / rundir.EVAL_PREF).read_text())
    assert saved["rows"] == 12 and saved["beta"] == BETA
    r = run_cli("eval", "--model", run)
    assert r.exit_code == 2 and "give --cache" in r.output
