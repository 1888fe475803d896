"""`prefpipe train` in one process: step-0 identities, float64 recomputation of logged numbers, every loss type
from the CLI, beta sweeps, eval split, and the errors of cache validation."""

import json
import math
import shutil

import pytest
import torch

from train_fixtures import one_thread  # noqa: F401  (autouse)
from train_fixtures import cache, metrics, pairs_data, train
from prefpipe import rundir

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory, tiny_model):
    return cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 24), "pairs24")


@pytest.fixture(scope="module")
def small_caches(tmp_path_factory, tiny_model):
    """8 pairs: one global batch holds the whole training set, so the data order cannot matter."""
    data = pairs_data(tmp_path_factory, 8)
    return {"paired": cache(tmp_path_factory, tiny_model, data, "pairs8"),
            "kto": cache(tmp_path_factory, tiny_model, data, "pairs8-kto", kto=True)}


# ------------------------------------------------------------------ float64 reference computations

def f64_model(path):
    from prefpipe.modeling import load_model
    return load_model(str(path), dtype=torch.float64)


def f64_logp(model, prompt, response):
    """Summed log-prob of `response` after `prompt`: a plain full-logits forward, nothing from prefpipe.logprobs."""
    ids = torch.tensor([list(prompt) + list(response)])
    logp = model(input_ids=ids).logits[0].log_softmax(-1)
    p0 = len(prompt)
    return sum(logp[p - 1, ids[0, p]] for p in range(p0, p0 + len(response)))


def read_table(cache_dir):
    from prefpipe.data.cache import read_cache
    return read_cache(cache_dir).table.to_pylist()


# ------------------------------------------------------------------ step 0

def test_step0_identities_for_every_reference_loss(tmp_path, tiny_model, pair_cache, small_caches):
    train(tmp_path / "p", tiny_model, cache=pair_cache, loss_types=("dpo", "hinge", "ipo"), betas=(0.25,),
          max_steps=1)
    first = {lt: metrics(tmp_path / "p" / f"{lt}-beta0.25")[0] for lt in ("dpo", "hinge", "ipo")}
    for rec in first.values():
        # the cached reference was scored in other batches: margins are float32 noise, so acc is not checked here
        assert abs(rec["margin"]) < 1e-5
    # Each loss at that noise, to first order in the margin m = mean(beta * delta) (the squares, ~1e-10, drop):
    # -logsigmoid(x) = ln 2 - x/2 + O(x^2); relu(1 - x) = 1 - x exactly; IPO (d - 1/(2 beta))^2 with
    # m = beta * mean(d) gives 1/(4 beta^2) - m / beta^2.
    m = {lt: first[lt]["margin"] for lt in first}
    assert first["dpo"]["loss"] == pytest.approx(LN2 - m["dpo"] / 2, abs=2e-7)
    assert first["hinge"]["loss"] == pytest.approx(1.0 - m["hinge"], abs=2e-7)
    assert first["ipo"]["loss"] == pytest.approx((1 / (2 * 0.25)) ** 2 - m["ipo"] / 0.25 ** 2, abs=1e-6)
    train(tmp_path / "k", tiny_model, cache=small_caches["kto"], loss_types=("kto",), max_steps=1)
    k = metrics(tmp_path / "k" / "kto-beta0.1")[0]
    # z0 = max(0, mean(pi - ref)) over the partners: 0 up to the same float32 noise as the margins above (the cache
    # was scored prompt-once and padded, the policy runs packed), and never negative
    assert k["loss"] == pytest.approx(0.5, abs=1e-6) and 0.0 <= k["kl"] < 1e-5
    # a live reference scores the very same batch with identical weights: the identities hold exactly
    train(tmp_path / "l", tiny_model, cache=pair_cache, reference="live", max_steps=1)
    d = metrics(tmp_path / "l" / "dpo-beta0.1")[0]
    assert d["loss"] == pytest.approx(LN2, abs=1e-7) and d["acc"] == 0.0 and d["margin"] == 0.0


def test_logged_numbers_match_float64_recomputation_dpo(tmp_path, tiny_model, small_caches):
    beta = 0.5
    train(tmp_path, tiny_model, cache=small_caches["paired"], betas=(beta,), batch_size=8, max_steps=2,
          save_every=1)
    run = tmp_path / f"dpo-beta{beta:g}"
    log = metrics(run)
    rows = read_table(small_caches["paired"])
    assert len(rows) == 8 and all(r["examples"] == 8 for r in log)

    # step 1: at the SFT weights every delta is 0; the gradient of the mean loss is
    # -beta/2 * mean(grad pi_c - grad pi_r). Its norm is the logged grad_norm (before clipping).
    sft = f64_model(tiny_model)
    loss = 0
    for r in rows:
        pc, pr = f64_logp(sft, r["prompt_ids"], r["chosen_ids"]), f64_logp(sft, r["prompt_ids"], r["rejected_ids"])
        loss = loss - torch.nn.functional.logsigmoid(beta * ((pc - pc.detach()) - (pr - pr.detach())))
    (loss / len(rows)).backward()
    gnorm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in sft.parameters() if p.grad is not None))
    assert log[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert log[0]["grad_norm"] == pytest.approx(gnorm, rel=1e-4)

    # step 2: the step-1 checkpoint against the SFT reference, all in float64
    ref = f64_model(tiny_model)
    pol = f64_model(run / rundir.CHECKPOINTS / "step-000001")
    with torch.no_grad():
        c = [float(f64_logp(pol, r["prompt_ids"], r["chosen_ids"]) - f64_logp(ref, r["prompt_ids"], r["chosen_ids"]))
             for r in rows]
        j = [float(f64_logp(pol, r["prompt_ids"], r["rejected_ids"])
                   - f64_logp(ref, r["prompt_ids"], r["rejected_ids"])) for r in rows]
    want_loss = sum(math.log1p(math.exp(-beta * (a - b))) for a, b in zip(c, j)) / 8
    assert abs(want_loss - LN2) > 1e-3  # the step moved the policy
    assert log[1]["loss"] == pytest.approx(want_loss, abs=2e-5)
    assert log[1]["r_chosen"] == pytest.approx(beta * sum(c) / 8, abs=2e-5)
    assert log[1]["r_rejected"] == pytest.approx(beta * sum(j) / 8, abs=2e-5)
    assert log[1]["acc"] == pytest.approx(sum(a > b for a, b in zip(c, j)) / 8)


def test_logged_numbers_match_float64_recomputation_kto(tmp_path, tiny_model, small_caches):
    beta = 0.5
    train(tmp_path, tiny_model, cache=small_caches["kto"], loss_types=("kto",), betas=(beta,), batch_size=16,
          max_steps=2, save_every=1)
    run = tmp_path / f"kto-beta{beta:g}"
    log = metrics(run)
    rows = read_table(small_caches["kto"])
    assert len(rows) == 16 and log[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    ref, pol = f64_model(tiny_model), f64_model(run / rundir.CHECKPOINTS / "step-000001")
    with torch.no_grad():
        h = [float(f64_logp(pol, r["prompt_ids"], r["completion_ids"]) - f64_logp(ref, r["prompt_ids"],
                                                                               r["completion_ids"])) for r in rows]
        kl = [float(f64_logp(pol, r["prompt_ids"], r["kl_completion_ids"])
                    - f64_logp(ref, r["prompt_ids"], r["kl_completion_ids"])) for r in rows]
    z0 = max(0.0, sum(kl) / len(kl))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses = [1 - sig(beta * (x - z0)) if r["label"] else 1 - sig(beta * (z0 - x)) for x, r in zip(h, rows)]
    assert log[1]["kl"] == pytest.approx(z0, abs=2e-5)
    assert log[1]["loss"] == pytest.approx(sum(losses) / 16, abs=2e-5)
    des = [beta * x for x, r in zip(h, rows) if r["label"]]
    und = [beta * x for x, r in zip(h, rows) if not r["label"]]
    assert log[1]["r_chosen"] == pytest.approx(sum(des) / len(des), abs=2e-5)
    assert log[1]["r_rejected"] == pytest.approx(sum(und) / len(und), abs=2e-5)


def test_orpo_step1_matches_float64_and_data_equals_no_reference_cache(tmp_path, tmp_path_factory, tiny_model):
    data = pairs_data(tmp_path_factory, 8)
    norefs = cache(tmp_path_factory, tiny_model, data, "pairs8-noref", no_reference=True)
    train(tmp_path / "c", tiny_model, cache=norefs, loss_types=("orpo",), batch_size=8, max_steps=3,
          loss_kw={"orpo_lambda": 0.5})
    train(tmp_path / "d", tiny_model, data=data, loss_types=("orpo",), batch_size=8, max_steps=3,
          loss_kw={"orpo_lambda": 0.5})
    a, b = metrics(tmp_path / "c" / "orpo"), metrics(tmp_path / "d" / "orpo")
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["nll"] == pytest.approx(y["nll"], abs=1e-6)
    sft = f64_model(tiny_model)
    losses, nlls = [], []
    with torch.no_grad():
        for r in read_table(norefs):
            ac = float(f64_logp(sft, r["prompt_ids"], r["chosen_ids"])) / len(r["chosen_ids"])
            ar = float(f64_logp(sft, r["prompt_ids"], r["rejected_ids"])) / len(r["rejected_ids"])
            lo = (ac - ar) - (math.log(-math.expm1(ac)) - math.log(-math.expm1(ar)))
            losses.append(-ac + 0.5 * math.log1p(math.exp(-lo)))
            nlls.append(-ac)
    assert a[0]["loss"] == pytest.approx(sum(losses) / 8, abs=1e-5)
    assert a[0]["nll"] == pytest.approx(sum(nlls) / 8, abs=1e-5)


# ------------------------------------------------------------------ the CLI, every loss type, sweeps

def test_every_loss_type_trains_from_the_cli(tmp_path, tiny_model, small_caches, run_cli):
    args = ["--model", tiny_model, "--lr", "1e-3", "--batch_size", "8", "--max_steps", "8", "--warmup_ratio", "0",
            "--lr_scheduler", "constant", "--no_progress", "--dtype", "float32", "--device", "cpu"]
    res = run_cli("train", "--cache", small_caches["paired"], "--out", tmp_path / "p", *args,
                  *sum((["--loss_type", lt] for lt in ("dpo", "ipo", "hinge", "orpo", "sft")), []))
    assert res.exit_code == 0, res.output
    res_k = run_cli("train", "--cache", small_caches["kto"], "--out", tmp_path / "k", *args,
                    "--batch_size", "16", "--loss_type", "kto")
    assert res_k.exit_code == 0, res_k.output
    expect = {"dpo": {"acc", "r_chosen", "r_rejected", "margin"}, "ipo": {"acc", "margin"},
              "hinge": {"acc", "margin"}, "orpo": {"nll", "log_odds", "acc", "margin"}, "sft": {"nll"},
              "kto": {"kl", "acc", "r_chosen", "r_rejected", "margin"}}
    sft_weights = _weights(tiny_model)
    for lt, keys in expect.items():
        run = tmp_path / ("k" if lt == "kto" else "p") / (lt if lt in ("orpo", "sft") else f"{lt}-beta0.1")
        log = metrics(run)
        assert len(log) == 8
        assert keys | {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(log[0])
        # the same batch every step (it holds the whole set): the objective must go down
        assert log[-1]["loss"] < log[0]["loss"] - 1e-3, (lt, [r["loss"] for r in log])
        w = _weights(run / rundir.FINAL)
        assert max(float((w[k] - sft_weights[k]).abs().max()) for k in w) > 1e-4
        assert (run / rundir.FINAL / "tokenizer.json").exists() and (run / rundir.FINAL / rundir.CONFIG).exists()
    assert "orpo" in res.output and "sft" in res.output  # the summary table


def test_every_registered_loss_trains_two_steps(tmp_path, tiny_model, small_caches, tmp_path_factory, run_cli):
    """The registry is complete: every LOSS_TYPES entry, and a combination, trains two steps through run_training
    on the cache kind its batch shape needs (all of one kind in one call, so the cache is read once), logs its
    declared metrics, and starts at its step-0 value where one is known. The reference-free ones also train
    from --data through `prefpipe train` (no cache, no reference)."""
    from prefpipe.train.registry import LOSS_TYPES, LOSSES, REFERENCE_FREE, run_label
    combo = "0.8*dpo+0.2*bco_pair+1*sft"
    step0 = {"dpo": LN2, "hinge": 1.0, "ipo": (1 / (2 * 0.1)) ** 2, "kto": 0.5, "robust": LN2,
             "exo_pair": -LN2 - 0.5 * (math.log(1e-3) + math.log(1 - 1e-3)), "nca_pair": 2 * LN2,
             "bco_pair": 2 * LN2, "sppo_hard": 2 * 5.0 ** 2, "aot": LN2, "aot_unpaired": LN2, "apo_zero": 1.0,
             "apo_down": 1.0, "discopop": (LN2 + 1) / 2, "sigmoid_norm": LN2, "dpop": LN2, "apo_zero_unpaired": 0.5}
    paired = [lt for lt in LOSS_TYPES if LOSSES[lt].paired] + [combo]
    unpaired = [lt for lt in LOSS_TYPES if not LOSSES[lt].paired]
    train(tmp_path / "p", tiny_model, cache=small_caches["paired"], loss_types=paired, batch_size=4, max_steps=2)
    train(tmp_path / "k", tiny_model, cache=small_caches["kto"], loss_types=unpaired, batch_size=4, max_steps=2)
    for lt in paired + unpaired:
        spec = LOSSES[lt]
        name = run_label(lt)
        run = tmp_path / ("p" if spec.paired else "k") / (f"{name}-beta0.1" if spec.uses_beta else name)
        log = metrics(run)
        assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log), lt
        assert set(spec.metrics) <= set(log[0]), lt
        assert ("margin" in log[0]) == ("r_chosen" in spec.metrics) and ("kl" in log[0]) == (spec.prestep is not None)
        if lt in step0:
            assert log[0]["loss"] == pytest.approx(step0[lt], abs=1e-4, rel=1e-5), lt
    rec = metrics(tmp_path / "p" / "0.8dpo+0.2bco_pair+1sft-beta0.1")[0]
    assert rec["loss_dpo"] == pytest.approx(LN2, abs=1e-4) and rec["loss_bco_pair"] == pytest.approx(2 * LN2, abs=1e-4)
    assert rec["loss"] == pytest.approx(0.8 * LN2 + 0.4 * LN2 + rec["loss_sft"], abs=1e-4)
    assert set(step0) | {"orpo", "sft", "simpo", "cpo"} <= set(LOSS_TYPES)

    free = [lt for lt in REFERENCE_FREE if LOSSES[lt].paired] + ["0.5*orpo+sft", "sigmoid_norm"]
    args = ["train", "--model", tiny_model, "--data", pairs_data(tmp_path_factory, 8), "--out", tmp_path / "d",
            "--max_steps", "2", "--batch_size", "4", "--lr", "1e-3", "--no_progress", "--device", "cpu"]
    res = run_cli(*args, *sum((["--loss_type", lt] for lt in free[:-1]), []))
    assert res.exit_code == 0, res.output
    for lt in free[:-1]:
        spec = LOSSES[lt]
        name = run_label(spec.name)
        log = metrics(tmp_path / "d" / (f"{name}-beta0.1" if spec.uses_beta else name))
        assert len(log) == 2 and math.isfinite(log[-1]["loss"]), lt
    res = run_cli(*args, "--loss_type", free[-1])  # a loss that needs the reference is refused without a cache
    assert res.exit_code != 0 and "sigmoid_norm" in res.output and "Traceback" not in res.output


def _weights(d):
    from safetensors.torch import load_file
    return load_file(str(d / "model.safetensors"))


def test_beta_sweep_writes_three_runs_from_one_cache_read(tmp_path, tiny_model, pair_cache, run_cli, monkeypatch):
    import prefpipe.train.train_data as train_data
    calls = []
    real = train_data.read_cache
    monkeypatch.setattr(train_data, "read_cache", lambda *a, **k: calls.append(a) or real(*a, **k))
    res = run_cli("train", "--model", tiny_model, "--cache", pair_cache, "--out", tmp_path, "--beta", "0.1",
                  "--beta", "0.3", "--beta", "1", "--lr", "1e-3", "--batch_size", "4", "--max_steps", "3",
                  "--eval_fraction", "0.25", "--no_progress", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    summary = json.loads((tmp_path / rundir.SUMMARY).read_text())
    names = [r["name"] for r in summary["runs"]]
    assert names == ["dpo-beta0.1", "dpo-beta0.3", "dpo-beta1"]
    for r in summary["runs"]:
        log = metrics(tmp_path / r["dir"])
        assert r["final"]["loss"] == log[-1]["loss"] and r["final"]["step"] == 3
        assert r["eval"]["step"] == 3 and r["eval"]["examples"] == 6  # round(0.25 * 24) held out
        assert (tmp_path / r["model_dir"] / "model.safetensors").exists()
        # float32 sums of ~50 nats differ by ~1e-5 between batchings; at beta = 1 that moves ln 2 by ~5e-6
        assert log[0]["examples"] == 4 and log[0]["loss"] == pytest.approx(LN2, abs=1e-5)
        assert res.output.count(r["name"]) >= 1
    for r in summary["runs"]:  # each run records the checks of the data it trained on
        assert r["validation"]["tokenizer"] == "match" and r["validation"]["model"] == "match"
        assert r["validation"]["drift"]["mean_abs_per_token"] < 1e-5
    # a larger beta scales the implicit rewards: the step-2 margins differ between runs
    m2 = [metrics(tmp_path / r["dir"])[1]["margin"] for r in summary["runs"]]
    assert len({round(m, 6) for m in m2}) == 3


def test_summary_json_names_every_cache_its_runs_trained_from(tmp_path, tmp_path_factory, tiny_model, small_caches):
    """Two train calls into one RUNS_DIR (as the pipeline makes: pairs, then KTO examples)."""
    train(tmp_path, tiny_model, cache=small_caches["paired"], max_steps=1)
    train(tmp_path, tiny_model, cache=small_caches["kto"], loss_types=("kto",), max_steps=1)
    train(tmp_path, tiny_model, data=pairs_data(tmp_path_factory, 8), loss_types=("orpo",), max_steps=1)
    summary = json.loads((tmp_path / rundir.SUMMARY).read_text())
    assert summary["caches"] == [str(small_caches["paired"]), str(small_caches["kto"])]
    assert "cache" not in summary  # one call's cache would pass for every run's
    sources = {r["name"]: r["source"] for r in summary["runs"]}
    assert sources["dpo-beta0.1"] == {"model": str(tiny_model), "cache": str(small_caches["paired"]), "data": None,
                                      "reference": "cached"}
    assert sources["kto-beta0.1"]["cache"] == str(small_caches["kto"])
    assert sources["orpo"]["cache"] is None and sources["orpo"]["reference"] == "none"
    assert json.loads((tmp_path / "kto-beta0.1" / rundir.RESULT).read_text())["source"] == sources["kto-beta0.1"]


def test_accumulation_and_checkpointing_leave_the_trajectory_unchanged(tmp_path, tiny_model, pair_cache):
    """4 micro-batches of 1 with accumulation, and activation checkpointing, against one batch of 4."""
    from train_fixtures import assert_trajectories_close, trajectory
    train(tmp_path / "a", tiny_model, cache=pair_cache, batch_size=4, grad_accum=1, max_steps=4)
    train(tmp_path / "b", tiny_model, cache=pair_cache, batch_size=1, grad_accum=4, max_steps=4)
    train(tmp_path / "c", tiny_model, cache=pair_cache, batch_size=4, max_steps=4, gradient_checkpointing=True)
    a = trajectory(tmp_path / "a" / "dpo-beta0.1")
    for other in ("b", "c"):
        b = trajectory(tmp_path / other / "dpo-beta0.1")
        # Step-1 acc is a step function of margins that are float32 noise (~1e-7) around 0; other batch shapes
        # round differently (see test_train_live). Every later step, and every other metric, is compared.
        b[0][1] = a[0][1]
        assert_trajectories_close(a, b, atol=1e-5)


def test_kto_balance_warning_by_hand():
    from prefpipe.data.kto_pairs import kto_balance_warning
    # 1 desirable, 3 undesirable, unit weights: 1*1/(1*3) = 0.33 < 1; lambda_D = 3 makes it exactly 1.
    w = kto_balance_warning([True, False, False, False], 1.0, 1.0)
    assert "= 0.33" in w and "--desirable_weight 3.0" in w
    assert kto_balance_warning([True, False, False, False], 3.0, 1.0) is None
    assert kto_balance_warning([True] * 4 + [False] * 3, 1.0, 1.0) is None  # 4/3, the upper end
    w = kto_balance_warning([True] * 3 + [False] * 2, 1.0, 1.0)  # 1.5 > 4/3
    assert "= 1.50" in w and "--desirable_weight 0.67" in w
    assert "0 undesirable" in kto_balance_warning([True, True], 1.0, 1.0)


def test_kto_cli_warns_about_imbalanced_weights(tmp_path, tiny_model, small_caches, run_cli):
    args = ["--model", tiny_model, "--cache", small_caches["kto"], "--loss_type", "kto", "--max_steps", "1",
            "--no_progress", "--dtype", "float32", "--device", "cpu"]
    balanced = run_cli("train", *args, "--out", tmp_path / "a")  # the pairs' KTO view: one of each per pair
    assert balanced.exit_code == 0 and "recommended [1, 4/3]" not in balanced.output
    heavy = run_cli("train", *args, "--out", tmp_path / "b", "--undesirable_weight", "2")
    assert heavy.exit_code == 0 and "= 0.50, outside the KTO paper's recommended [1, 4/3]" in heavy.output
    assert "--desirable_weight 2.0" in heavy.output


def test_kto_on_a_cache_of_unpaired_data(tmp_path, tmp_path_factory, tiny_model):
    from train_fixtures import unpaired_data
    kcache = cache(tmp_path_factory, tiny_model, unpaired_data(tmp_path_factory, 12), "unpaired12")
    train(tmp_path, tiny_model, cache=kcache, loss_types=("kto",), batch_size=4, max_steps=3)
    log = metrics(tmp_path / "kto-beta0.1")
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-6) and log[0]["examples"] == 4
    assert log[-1]["loss"] != pytest.approx(0.5, abs=1e-4)


# ------------------------------------------------------------------ validation errors

@pytest.fixture(scope="module")
def other_models(tmp_path_factory, tiny_model):
    """Same tokenizer, other weights; and another tokenizer altogether."""
    from transformers import AutoTokenizer

    from prefpipe.tiny import build_model, build_tokenizer
    root = tmp_path_factory.mktemp("other-models")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    build_model(root / "reweighted", tok, seed=1)
    tok2 = build_tokenizer(root / "retokenized", corpus=["entirely different words", "zebra quartz jungle"] * 5,
                           vocab_size=300)
    build_model(root / "retokenized", tok2)
    return root


def test_tokenizer_mismatch_names_what_differs(tmp_path, tmp_path_factory, tiny_model, other_models, run_cli):
    foreign = cache(tmp_path_factory, other_models / "retokenized", pairs_data(tmp_path_factory, 8), "retok8")
    res = run_cli("train", "--model", tiny_model, "--cache", foreign, "--out", tmp_path, "--no_progress")
    assert res.exit_code == 2
    assert "different tokenizer" in res.stderr and "vocab" in res.stderr and "Traceback" not in res.output


def test_model_mismatch_is_an_error_unless_allowed_and_drift_is_logged(tmp_path, tmp_path_factory, tiny_model,
                                                                       other_models, run_cli):
    foreign = cache(tmp_path_factory, other_models / "reweighted", pairs_data(tmp_path_factory, 8), "rew8")
    base = ["train", "--model", tiny_model, "--cache", foreign, "--max_steps", "1", "--batch_size", "4",
            "--no_progress", "--device", "cpu"]
    res = run_cli(*base, "--out", tmp_path / "a")
    assert res.exit_code == 2 and "another model" in res.stderr and "--allow_reference_mismatch" in res.stderr
    assert not (tmp_path / "a" / "dpo-beta0.1").exists()
    res = run_cli(*base, "--out", tmp_path / "b", "--allow_reference_mismatch")
    assert res.exit_code == 0, res.output
    drift = json.loads((tmp_path / "b" / rundir.SUMMARY).read_text())["runs"][0]["validation"]["drift"]
    assert drift["mean_abs_per_token"] > 0.1  # a different random model: whole nats per token
    assert "step-0 drift" in res.stderr and "warning" in res.stderr


def test_drift_above_threshold_stops_before_step_one(tmp_path, tiny_model, small_caches, run_cli):
    """Same model fingerprint, but reference sums that are off by 0.3 nats per token (as a wrong template or
    engine would make them): the drift check stops the run."""
    from prefpipe.data.cache import read_cache, read_manifest, write_manifest, write_part
    src = read_cache(small_caches["paired"])
    cols = src.table.to_pydict()
    cols["ref_chosen"] = [v - 0.3 * n for v, n in zip(cols["ref_chosen"], cols["chosen_len"])]
    bad = tmp_path / "bad-cache"
    bad.mkdir()
    write_part(bad / "part-00000.parquet", cols, "paired", src.metadata)
    write_manifest(bad, read_manifest(small_caches["paired"])["metadata"], [{"file": "part-00000.parquet",
                                                                             "rows": len(cols["row_id"])}])
    base = ["train", "--model", tiny_model, "--cache", bad, "--max_steps", "1", "--batch_size", "4",
            "--no_progress", "--device", "cpu"]
    res = run_cli(*base, "--out", tmp_path / "a")
    assert res.exit_code == 2 and "nats per token" in res.stderr and "--max_drift" in res.stderr
    assert not (tmp_path / "a" / "dpo-beta0.1" / rundir.METRICS).exists()
    res = run_cli(*base, "--out", tmp_path / "b", "--max_drift", "0.5")  # 0.3 * chosen tokens / all tokens < 0.5
    assert res.exit_code == 0, res.output


def test_wrong_cache_kinds_and_missing_references_are_clear_errors(tmp_path, tmp_path_factory, tiny_model,
                                                                   small_caches, run_cli):
    common = ["--model", tiny_model, "--no_progress", "--device", "cpu"]
    res = run_cli("train", *common, "--cache", small_caches["paired"], "--loss_type", "kto", "--out", tmp_path / "a")
    assert res.exit_code == 2 and "--kto" in res.stderr
    res = run_cli("train", *common, "--cache", small_caches["kto"], "--loss_type", "dpo", "--out", tmp_path / "b")
    assert res.exit_code == 2 and "paired cache" in res.stderr
    noref = cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 8), "pairs8-noref", no_reference=True)
    res = run_cli("train", *common, "--cache", noref, "--out", tmp_path / "c")
    assert res.exit_code == 2 and "no reference log-probs" in res.stderr
    res = run_cli("train", *common, "--data", pairs_data(tmp_path_factory, 8), "--out", tmp_path / "d")
    assert res.exit_code == 2 and "no reference" in res.stderr or "--reference live" in res.stderr
    res = run_cli("train", *common, "--cache", small_caches["paired"], "--loss_type", "kto", "--loss_type", "dpo",
                  "--out", tmp_path / "e")
    assert res.exit_code == 2 and "its own" in res.stderr
    res = run_cli("train", *common, "--cache", small_caches["paired"], "--fsdp", "--out", tmp_path / "f")
    assert res.exit_code == 2 and "torchrun" in res.stderr


def test_an_existing_run_needs_resume(tmp_path, tiny_model, small_caches, run_cli):
    args = ["train", "--model", tiny_model, "--cache", small_caches["paired"], "--out", tmp_path, "--max_steps", "1",
            "--batch_size", "4", "--no_progress", "--device", "cpu"]
    assert run_cli(*args).exit_code == 0
    res = run_cli(*args)
    assert res.exit_code == 2 and "--resume" in res.stderr
    res = run_cli(*args, "--resume")  # finished: skipped, summary rewritten
    assert res.exit_code == 0 and "already finished" in res.stderr
    shutil.rmtree(tmp_path)


def test_resume_from_a_checkpoint_that_predates_a_loss_option(tmp_path, tiny_model, pair_cache):
    """A checkpoint whose recorded loss settings lack an option added later resumes when the run leaves that option
    at its default, and is refused when the run sets it."""
    from prefpipe.errors import UserError
    from prefpipe.train.checkpoint import load_trainer_state

    train(tmp_path, tiny_model, cache=pair_cache, max_steps=4, save_every=2)
    run = tmp_path / "dpo-beta0.1"
    shutil.rmtree(run / rundir.FINAL)
    (run / rundir.RESULT).unlink()
    ckpt = run / rundir.CHECKPOINTS / "step-000002" / "trainer_state.pt"
    state = load_trainer_state(ckpt.parent)
    del state["identity"]["loss"]["wpo"], state["identity"]["loss"]["label_smoothing"]
    torch.save(state, ckpt)
    for p in (run / rundir.CHECKPOINTS).glob("step-00000[3-9]"):
        shutil.rmtree(p)
    train(tmp_path, tiny_model, cache=pair_cache, max_steps=4, save_every=2, resume=True)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    shutil.rmtree(run / rundir.FINAL)
    (run / rundir.RESULT).unlink()
    for p in (run / rundir.CHECKPOINTS).glob("step-00000[3-9]"):
        shutil.rmtree(p)
    with pytest.raises(UserError, match=r"different settings \(loss\)"):
        train(tmp_path, tiny_model, cache=pair_cache, max_steps=4, save_every=2, resume=True,
              loss_kw={"label_smoothing": 0.1})
