"""LoRA (peft) training, adapter directories as models, and the 4-bit error.

Every comparison is against an independent computation: a live reference against the cache, a resumed run against
an uninterrupted one, the saved adapter against a hand merge (W + alpha/r * B A) in float64, and a cache made from
an SFT adapter against a float64 forward of base + adapter done here."""

import json
import shutil

import pytest
import torch

from train_fixtures import one_thread  # noqa: F401  (autouse)
from train_fixtures import assert_trajectories_close, cache, metrics, pairs_data, train, trajectory
from prefpipe import rundir

ATOL = 1e-5  # as in test_train_live: float32 sums of ~50 nats scored in differently padded batches
LR = 1e-2  # LoRA starts at B = 0 and moves slowly at the full fine-tune's 1e-3


def lora(**kw):
    from prefpipe.train.config import LoraConfig
    return LoraConfig(**{"lora_r": 4, **kw})


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory, tiny_model):
    return cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 24), "pairs24")


@pytest.fixture
def count_loads(monkeypatch):
    """How many times a model is loaded (every path goes through prefpipe.modeling.load_model)."""
    import prefpipe.modeling as modeling
    calls = []
    real = modeling.load_model

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)
    monkeypatch.setattr(modeling, "load_model", counting)
    return calls


def _adapter_weights(d):
    from safetensors.torch import load_file
    return load_file(d / "adapter_model.safetensors")


def test_live_reference_is_the_policy_with_its_adapter_off(tmp_path, tiny_model, pair_cache, count_loads):
    kw = dict(cache=pair_cache, batch_size=4, max_steps=8, eval_fraction=0.25, lr=LR, lora=lora())
    train(tmp_path / "cached", tiny_model, reference="cached", **kw)
    assert len(count_loads) == 1
    train(tmp_path / "live", tiny_model, reference="live", **kw)
    assert len(count_loads) == 2  # one model for policy and reference: no frozen copy
    a, b = tmp_path / "cached" / "dpo-beta0.1", tmp_path / "live" / "dpo-beta0.1"
    ta, tb = trajectory(a), trajectory(b)
    assert tb[0][1] == 0.0 and abs(ta[0][4]) < 1e-5  # step-1 acc: see test_train_live
    ta[0][1] = tb[0][1]
    assert_trajectories_close(ta, tb, ATOL)
    assert abs(ta[-1][0] - ta[0][0]) > 1e-2  # the adapter moved the policy, so the check compares something
    ea, eb = metrics(a, "eval"), metrics(b, "eval")
    assert len(ea) == len(eb) >= 2
    assert_trajectories_close([[r["loss"], r["margin"]] for r in ea], [[r["loss"], r["margin"]] for r in eb], ATOL)
    # the full fine-tune's live reference is a second copy, which the counter sees
    train(tmp_path / "full", tiny_model, reference="live", cache=pair_cache, max_steps=1)
    assert len(count_loads) == 4


def test_checkpoints_hold_the_adapter_and_resume_exactly(tmp_path, tiny_model, pair_cache, capfd):
    kw = dict(cache=pair_cache, batch_size=4, max_steps=6, save_every=3, lr=LR, seed=2, lora=lora(lora_r=2),
              gradient_checkpointing=True)
    train(tmp_path / "straight", tiny_model, **kw)
    run = tmp_path / "cut" / "dpo-beta0.1"
    train(tmp_path / "cut", tiny_model, **kw)
    ckpt = run / rundir.CHECKPOINTS / "step-000003"
    weights = _adapter_weights(ckpt)
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert not any(f.name.startswith("model") for f in ckpt.iterdir())  # no frozen weights
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    # AdamW state for exactly the adapter's tensors, nothing for the frozen ones
    assert len(state["optimizer"]["state"]) == len(weights)
    assert state["identity"]["lora"]["lora_r"] == 2
    # pretend the run was killed after the step-3 checkpoint
    shutil.rmtree(run / rundir.FINAL)
    (run / rundir.RESULT).unlink()
    capfd.readouterr()
    train(tmp_path / "cut", tiny_model, resume=True, **kw)
    assert "resuming after step 3" in capfd.readouterr().err
    keys = ("loss", "margin", "grad_norm", "lr")
    assert trajectory(run, keys) == trajectory(tmp_path / "straight" / "dpo-beta0.1", keys)
    wa, wb = _adapter_weights(run / rundir.FINAL), _adapter_weights(tmp_path / "straight" / "dpo-beta0.1" / rundir.FINAL)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    from prefpipe.errors import UserError
    (run / rundir.RESULT).unlink()
    with pytest.raises(UserError, match="lora"):  # another rank cannot continue this adapter
        train(tmp_path / "cut", tiny_model, resume=True, **{**kw, "lora": lora(lora_r=3)})


def _hand_merged(base_dir, adapter_dir, dtype=torch.float64):
    """base + alpha/r * B A for every adapted weight, from the files alone (no peft)."""
    from transformers import AutoModelForCausalLM
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    sd = m.state_dict()
    w = _adapter_weights(adapter_dir)
    for k in w:
        if ".lora_A." in k:
            name = k.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = w[k.replace(".lora_A.", ".lora_B.")].to(dtype)
            sd[name] += scale * b @ w[k].to(dtype)
    m.load_state_dict(sd)
    return m


def test_final_adapter_loads_with_peft_and_merges(tmp_path, tiny_model, pair_cache, monkeypatch):
    from peft import PeftModel

    import prefpipe.train.checkpoint as ck
    from prefpipe.modeling import load_model
    trained = {}
    real = ck.save_final

    def keep(rd, tr, *a, **kw):
        trained["lm"] = tr.lm
        return real(rd, tr, *a, **kw)
    monkeypatch.setattr(ck, "save_final", keep)
    train(tmp_path, tiny_model, cache=pair_cache, max_steps=4, lr=LR, lora=lora(lora_alpha=16.0, merge=True))
    run = tmp_path / "dpo-beta0.1"
    ids = torch.tensor([[1, 5, 9, 14, 30, 2, 7, 99]])
    with torch.no_grad():
        policy = trained["lm"].eval()(input_ids=ids).logits
        peft_lm = PeftModel.from_pretrained(load_model(str(tiny_model)), str(run / rundir.FINAL)).eval()
        via_peft = peft_lm(input_ids=ids).logits
        by_hand = _hand_merged(tiny_model, run / rundir.FINAL)(input_ids=ids).logits
        merged = load_model(str(run / "final-merged")).eval()(input_ids=ids).logits
        base = load_model(str(tiny_model)).eval()(input_ids=ids).logits
    assert float((policy - base).abs().max()) > 1e-3  # the adapter changed the model
    for other in (via_peft, merged):
        assert float((policy - other).abs().max()) < 1e-4
    assert float((policy.double() - by_hand).abs().max()) < 1e-4
    assert (run / "final-merged" / "config.json").exists() and not (run / rundir.FINAL / "config.json").exists()
    assert json.loads((run / rundir.FINAL / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_every_paired_loss_and_a_sweep_train_an_adapter(tmp_path, tiny_model, pair_cache):
    from prefpipe.train.registry import LOSSES, PAIRED_LOSSES
    summary = train(tmp_path, tiny_model, cache=pair_cache, loss_types=PAIRED_LOSSES, betas=(0.1, 0.3),
                    max_steps=2, lr=LR, lora=lora())
    names = [r["name"] for r in summary["runs"]]
    assert len(names) == sum(2 if LOSSES[t].uses_beta else 1 for t in PAIRED_LOSSES)
    for r in summary["runs"]:
        assert r["final"]["loss"] is not None
        assert (tmp_path / r["dir"] / rundir.FINAL / "adapter_model.safetensors").exists()
    # every run of the sweep starts from B = 0, i.e. from the SFT model: the DPO step-1 loss is log 2 exactly
    for beta in (0.1, 0.3):
        assert abs(metrics(tmp_path / f"dpo-beta{beta:g}")[0]["loss"] - 0.6931471805599453) < 1e-5


def test_kto_with_lora_live_matches_cached(tmp_path, tiny_model, tmp_path_factory):
    kto = cache(tmp_path_factory, tiny_model, pairs_data(tmp_path_factory, 8), "pairs8-kto", kto=True)
    kw = dict(cache=kto, loss_types=("kto",), batch_size=4, max_steps=6, lr=LR, lora=lora())
    train(tmp_path / "cached", tiny_model, reference="cached", **kw)
    train(tmp_path / "live", tiny_model, reference="live", **kw)
    ta, tb = trajectory(tmp_path / "cached" / "kto-beta0.1"), trajectory(tmp_path / "live" / "kto-beta0.1")
    ta[0][1] = tb[0][1]
    assert_trajectories_close(ta, tb, ATOL)


# ---------------------------------------------------------------- an SFT model that is itself an adapter

@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, tiny_model):
    """base = the tiny model; SFT = a LoRA adapter on it with non-zero B (so SFT != base). No tokenizer files:
    the base's tokenizer is used."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    out = tmp_path_factory.mktemp("sft-adapter")
    torch.manual_seed(11)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    m.save_pretrained(str(out))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model)
    return out


def _float64_scores(model, table):
    """Summed response log-probs by a plain full-sequence forward (not prefpipe's scorer)."""
    out = []
    with torch.no_grad():
        for p, c in zip(table.column("prompt_ids").to_pylist(), table.column("chosen_ids").to_pylist()):
            ids = torch.tensor([p + c])
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            out.append(float(logp[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)].sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_sft_adapter_is_the_reference_everywhere(tmp_path, tmp_path_factory, tiny_model, sft_adapter, run_cli):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prefpipe.data.cache import read_cache
    from prefpipe.data.fingerprint import model_fingerprint
    data = pairs_data(tmp_path_factory, 24)
    res = run_cli("data", "check", data, "--model", sft_adapter)
    assert res.exit_code == 0, res.output
    c = cache(tmp_path_factory, sft_adapter, data, "pairs24-sft-adapter")
    t = read_cache(str(c)).table
    cached = torch.tensor(t.column("ref_chosen").to_pylist(), dtype=torch.float64)
    base64 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    bare = _float64_scores(base64, t)
    sft64 = PeftModel.from_pretrained(base64, str(sft_adapter)).eval()
    expect = _float64_scores(sft64, t)
    assert float((cached - expect).abs().max()) < 1e-3
    assert float((cached - bare).abs().mean()) > 0.1  # the bare base would be a different reference

    fp = model_fingerprint(sft_adapter)
    assert read_cache(str(c)).metadata["model"]["fingerprint"] == fp != model_fingerprint(tiny_model)

    # LoRA on the SFT adapter: the model check passes and the step-0 drift is float32 round-off
    s = train(tmp_path, sft_adapter, cache=c, max_steps=2, lr=LR, lora=lora())
    assert s["validation"]["model"] == "match"
    assert s["validation"]["drift"]["mean_abs_per_token"] < 1e-5
    final = tmp_path / "dpo-beta0.1" / rundir.FINAL
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(sft_adapter.resolve())

    # eval of the SFT adapter against its own cache: policy == reference, so every margin is ~0
    from prefpipe.evaluation.evaluate import eval_preference, resolve_run
    r = eval_preference(resolve_run(sft_adapter), str(c), beta=0.1, device="cpu", dtype="float32")
    assert abs(r["margin"]) < 1e-5 and r["acc"] == 0.0
    # and the trained run's final/ (an adapter on the SFT adapter) evaluates too, as a moved policy
    r = eval_preference(resolve_run(tmp_path / "dpo-beta0.1"), str(c), device="cpu", dtype="float32")
    assert r["rows"] == 24 and abs(r["margin"]) > 1e-4

    # the fingerprint covers the adapter weights
    from safetensors.torch import load_file, save_file
    moved = tmp_path / "sft-moved"
    shutil.copytree(sft_adapter, moved)
    w = load_file(moved / "adapter_model.safetensors")
    k = next(iter(w))
    w[k] = w[k] + 1e-3
    save_file(w, moved / "adapter_model.safetensors")
    assert model_fingerprint(moved) != fp


# ---------------------------------------------------------------- errors

def test_load_in_4bit_is_a_one_line_error_without_cuda(tmp_path, tiny_model, pair_cache, pairs_file, run_cli):
    res = run_cli("train", "--model", tiny_model, "--cache", pair_cache, "--out", tmp_path / "r", "--lora_r", 4,
                  "--load_in_4bit", "--device", "cpu", "--no_progress")
    assert res.exit_code != 0
    assert "--load_in_4bit needs a CUDA GPU" in res.output and "Traceback" not in res.output
    res = run_cli("precompute", "--model", tiny_model, "--data", pairs_file, "--out", tmp_path / "c",
                  "--load_in_4bit", "--device", "cpu", "--no_progress")
    assert res.exit_code != 0 and "--load_in_4bit needs a CUDA GPU" in res.output
    res = run_cli("train", "--model", tiny_model, "--cache", pair_cache, "--out", tmp_path / "r2",
                  "--load_in_4bit", "--device", "cpu")
    assert res.exit_code != 0 and "--lora_r" in res.output


def test_bad_lora_options(tmp_path, tiny_model, pair_cache, run_cli):
    common = ["train", "--model", tiny_model, "--cache", pair_cache, "--no_progress", "--device", "cpu"]
    res = run_cli(*common, "--out", tmp_path / "a", "--lora_r", -1)
    assert res.exit_code != 0 and "--lora_r must be >= 0" in res.output
    res = run_cli(*common, "--out", tmp_path / "b", "--lora_r", 4, "--lora_target_modules", "no_such_proj",
                  "--max_steps", 1)
    assert res.exit_code != 0 and "--lora_target_modules" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------- torchrun

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_distributed_lora_matches_one_process(tmp_path, tiny_model, pair_cache, mode):
    """2 CPU processes (gloo), live reference with the adapter off, a checkpoint: the same trajectory and adapter
    as one process with the same global batch (tolerance as in test_train_dist). Both sides pad: a packed row per
    process is not the same matmul as one packed row for both processes' pairs (tests/train/test_packing.py checks
    packed DDP on its own)."""
    from test_train_dist import COMMON, torchrun
    train(tmp_path / "one", tiny_model, cache=pair_cache, reference="live", batch_size=4, max_steps=8,
          warmup_ratio=0.25, save_every=4, lr=LR, lora=lora(), padding_free=False)
    common = [c for c in COMMON if c != "1e-3"]
    common[common.index("--lr") + 1:common.index("--lr") + 1] = [str(LR)]
    proc = torchrun("--model", tiny_model, "--cache", pair_cache, "--reference", "live", "--batch_size", 2,
                    "--save_every", 4, "--lora_r", 4, "--out", tmp_path / "two", "--no_padding_free", *common,
                    *(["--fsdp"] if mode == "fsdp" else []))
    assert f"{mode} on 2 process(es)" in proc.stderr
    one, two = tmp_path / "one" / "dpo-beta0.1", tmp_path / "two" / "dpo-beta0.1"
    a, b = trajectory(one), trajectory(two)
    a[0][1] = b[0][1]
    assert_trajectories_close(a, b, 1e-5)
    for sub in ("checkpoints/step-000004", "final"):
        wa, wb = _adapter_weights(one / sub), _adapter_weights(two / sub)
        assert wa.keys() == wb.keys() and len(wa) > 0
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_vllm_backend_refuses_an_adapter_directory(tmp_path, sft_adapter, pairs_file, run_cli):
    """vLLM would load the adapter's base model: refused in one line before any engine starts."""
    res = run_cli("precompute", "--model", sft_adapter, "--data", pairs_file, "--out", tmp_path / "c",
                  "--backend", "vllm", "--no_progress")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "PEFT adapter" in res.output and "--backend hf" in res.output
