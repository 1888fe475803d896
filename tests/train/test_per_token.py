"""Per-token reference log-probs (`precompute --per_token`), LD-DPO (`--ld_alpha`) and WPO (`--wpo`).

Every expected value is recomputed independently: per-token log-probs from a float64 copy of the model's full
logits, LD-DPO and WPO from hand-derived numbers or from their definitions (REFERENCE section 10).
"""

from __future__ import annotations

import copy
import json
import math

import pyarrow as pa
import pytest
import torch

from train_fixtures import cache, one_thread, pairs_data  # noqa: F401

from prefpipe.data.cache import read_cache
from prefpipe import rundir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pairs_data(tmp_path_factory, 16)


@pytest.fixture(scope="module")
def pt_cache(tmp_path_factory, tiny_model, data):
    return cache(tmp_path_factory, tiny_model, data, "pertoken16", per_token=True)


@pytest.fixture(scope="module")
def plain_cache(tmp_path_factory, tiny_model, data):
    return cache(tmp_path_factory, tiny_model, data, "plain16")


def float64_token_logprobs(lm64, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Each response token's log-prob from the full float64 logits of one unpadded sequence."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = lm64(input_ids=ids).logits[0].double()
    logp = logits.log_softmax(-1)
    pos = torch.arange(len(prompt), len(prompt) + len(response))
    return logp[pos - 1, ids[0, pos]]


@pytest.fixture(scope="module")
def lm64(tiny_lm):
    return copy.deepcopy(tiny_lm).double().eval()


# ---------------------------------------------------------------- the cache

def test_per_token_columns_match_a_float64_recomputation(pt_cache, lm64):
    c = read_cache(pt_cache)
    assert c.metadata["per_token"] is True and c.has_per_token
    for name in ("ref_chosen_tokens", "ref_rejected_tokens"):
        assert c.table.schema.field(name).type == pa.list_(pa.float32())
    t = c.table.to_pydict()
    for i in range(len(t["row_id"])):
        for ids, ref, toks, n in (("chosen_ids", "ref_chosen", "ref_chosen_tokens", "chosen_len"),
                                  ("rejected_ids", "ref_rejected", "ref_rejected_tokens", "rejected_len")):
            want = float64_token_logprobs(lm64, t["prompt_ids"][i], t[ids][i])
            got = torch.tensor(t[toks][i], dtype=torch.float64)
            assert got.shape == want.shape == (t[n][i],)
            assert torch.allclose(got, want, atol=2e-5, rtol=0), (i, ids, (got - want).abs().max())
            # the float32 values add up to the float64 sum column within float32 round-off
            assert math.fsum(t[toks][i]) == pytest.approx(t[ref][i], abs=1e-5 * max(1.0, abs(t[ref][i])))


def test_kto_cache_stores_per_token_columns_for_both_responses(tmp_path_factory, tiny_model, data):
    c = read_cache(cache(tmp_path_factory, tiny_model, data, "kto-pertoken16", kto=True, per_token=True))
    t = c.table.to_pydict()
    for i in range(len(t["row_id"])):
        assert len(t["ref_logp_tokens"][i]) == t["completion_len"][i]
        assert len(t["ref_kl_tokens"][i]) == len(t["kl_completion_ids"][i])
        assert math.fsum(t["ref_kl_tokens"][i]) == pytest.approx(t["ref_kl"][i], abs=1e-4)


def test_a_damaged_per_token_list_is_refused(tmp_path, pt_cache):
    import shutil

    import pyarrow.parquet as pq

    from prefpipe.errors import UserError
    d = tmp_path / "c"
    shutil.copytree(pt_cache, d)
    part = d / "part-00000.parquet"
    t = pq.read_table(part)
    rows = t.column("ref_rejected_tokens").to_pylist()
    rows[2] = rows[2][:-1]  # one value short of the response's scored tokens
    t = t.set_column(t.schema.get_field_index("ref_rejected_tokens"), "ref_rejected_tokens",
                     pa.array(rows, pa.list_(pa.float32())))
    pq.write_table(t, part)
    with pytest.raises(UserError) as e:
        read_cache(d)
    assert e.value.row == 3 and e.value.column == "ref_rejected_tokens"


def test_per_token_is_part_of_the_reuse_identity(pt_cache, plain_cache):
    from prefpipe.data import identity
    a = identity.identity_of(read_cache(pt_cache).metadata)
    b = identity.identity_of(read_cache(plain_cache).metadata)
    assert identity.differences(a, b) == ["it has no per-token reference log-probs (precompute --per_token), "
                                          "this run needs them"]
    # a cache without per-token values keeps the directory name it had before the key existed
    old = {k: v for k, v in identity.reuse(b).items() if k != "per_token"}
    assert identity.key(identity.reuse(b)) == identity.key(old) != identity.key(identity.reuse(a))


def test_inspect_says_whether_per_token_values_are_there(run_cli, pt_cache, plain_cache):
    r = run_cli("inspect", pt_cache)
    assert r.exit_code == 0 and "per-token reference log-probs: yes" in r.output
    assert "reference log-prob of single tokens:" in r.output
    r = run_cli("inspect", plain_cache)
    assert r.exit_code == 0 and "per-token reference log-probs: no" in r.output


def test_per_token_needs_reference(run_cli, tiny_model, data, tmp_path):
    r = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", tmp_path / "c", "--per_token",
                "--no_reference")
    assert r.exit_code == 2 and "--per_token" in r.output + r.stderr


# ---------------------------------------------------------------- drift

def test_drift_names_the_worst_token(pt_cache, tiny_lm):
    from prefpipe.train.train_data import TrainData
    from prefpipe.train.parallel import Scorer
    from prefpipe.train.validate import measure_drift

    c = read_cache(pt_cache)
    col = c.table.column("ref_rejected_tokens").to_pylist()
    col[5][3] += 0.75  # one cached token off by 0.75 nats
    table = c.table.set_column(c.table.schema.get_field_index("ref_rejected_tokens"), "ref_rejected_tokens",
                               pa.array(col, pa.list_(pa.float32())))
    data = TrainData("paired", table, True, str(pt_cache), c.metadata, (), True)
    drift = measure_drift(Scorer(tiny_lm), data, list(range(len(data))), 4, 0, torch.device("cpu"),
                          torch.autocast("cpu", enabled=False))
    w = drift["worst_token"]
    assert (w["row_id"], w["response"], w["position"]) == (table.column("row_id")[5].as_py(), "rejected", 3)
    assert w["abs_diff"] == pytest.approx(0.75, abs=1e-4)


# ---------------------------------------------------------------- LD-DPO

def test_ld_dpo_by_hand():
    from prefpipe.train.losses import ld_dpo_loss
    # one pair: chosen has 3 tokens, rejected 2, so m = 2 and only the chosen's third token is down-weighted
    pi_c_tok = torch.tensor([[-1.0, -2.0, -4.0]])
    ref_c_tok = torch.tensor([[-1.5, -2.0, -3.0]])
    pi_r_tok = torch.tensor([[-3.0, -1.0, 0.0]])  # padded
    ref_r_tok = torch.tensor([[-2.0, -1.5]])
    alpha, beta = 0.5, 0.1
    # policy chosen: -1 - 2 + 0.5 * -4 = -5; reference chosen: -1.5 - 2 + 0.5 * -3 = -5; rejected: -4 and -3.5
    c, r = -5.0 - -5.0, -4.0 - -3.5
    want = -math.log(1 / (1 + math.exp(-beta * (c - r))))
    out = ld_dpo_loss(torch.tensor([-7.0]), torch.tensor([-4.0]), torch.tensor([-6.5]), torch.tensor([-3.5]),
                      torch.tensor([3.0]), torch.tensor([2.0]), pi_c_tok, pi_r_tok, ref_c_tok, ref_r_tok,
                      beta=beta, ld_alpha=alpha)
    assert float(out.losses[0]) == pytest.approx(want, rel=1e-6)
    assert float(out.metrics["r_chosen"][0]) == pytest.approx(beta * c, abs=1e-7)
    assert float(out.metrics["r_rejected"][0]) == pytest.approx(beta * r, abs=1e-7)


def test_ld_dpo_alpha_one_is_dpo_exactly_and_step_zero_is_ln2():
    from prefpipe.train.losses import dpo_loss, ld_dpo_loss
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    len_c, len_r = torch.randint(1, T + 1, (B,), generator=g).float(), torch.randint(1, T + 1, (B,), generator=g).float()
    toks = [-torch.rand(B, T, generator=g) * 3 for _ in range(4)]
    sums = [-torch.rand(B, generator=g) * 20 for _ in range(4)]  # deliberately not the sums of toks
    one = ld_dpo_loss(*sums, len_c, len_r, *toks, beta=0.3, ld_alpha=1.0)
    assert torch.equal(one.losses, dpo_loss(*sums, beta=0.3).losses)
    # policy == reference: zero rewards and ln 2 whatever alpha
    pi_c, pi_r = sums[0], sums[1]
    same = ld_dpo_loss(pi_c, pi_r, pi_c, pi_r, len_c, len_r, toks[0], toks[1], toks[0], toks[1], beta=0.3,
                       ld_alpha=0.2)
    assert torch.allclose(same.losses, torch.full((B,), math.log(2.0)), atol=1e-7)


def test_ld_alpha_options():
    from prefpipe.options import OptionError
    from prefpipe.train.config import LossConfig
    cfg = LossConfig(ld_alpha=0.5)
    assert cfg.spec.name == "ld_dpo" and cfg.needs_per_token_reference and cfg.run_name == "dpo-beta0.1-ld0.5"
    assert LossConfig().spec.name == "dpo" and not LossConfig().needs_per_token_reference
    with pytest.raises(OptionError, match="--ld_alpha"):
        LossConfig(ld_alpha=1.5)
    assert LossConfig(loss_type="ipo", ld_alpha=0.5).run_name == "ipo-beta0.1"  # ipo does not read it
    from prefpipe.train.config import SourceConfig, TrainConfig
    with pytest.raises(OptionError, match="--ld_alpha is read by no loss of this call"):
        TrainConfig(SourceConfig(model="m", data="d"), "out", ("ipo",), loss=LossConfig(ld_alpha=0.5))
    with pytest.raises(OptionError, match="--wpo"):
        LossConfig(loss_type="sft", wpo=True)
    assert LossConfig(wpo=True).run_name == "dpo-beta0.1-wpo"


# ---------------------------------------------------------------- WPO

def test_wpo_weight_matches_a_float64_recomputation(tiny_lm, lm64):
    from prefpipe.logprobs import pad_batch, sequence_logprobs
    from prefpipe.train.losses import wpo_weights
    pairs = [([1, 5, 9], [4, 7, 2, 8]), ([3, 3], [6]), ([2, 10, 11, 12], [13, 14, 15])]
    ids, mask = pad_batch([p + r for p, r in pairs], pad_id=0)
    plens = torch.tensor([len(p) for p, _ in pairs])
    sums, counts, _, ex = sequence_logprobs(tiny_lm, ids, mask, plens, chunk_tokens=2,
                                            extras=("tokens", "log_sum_sq"))
    got = wpo_weights(ex["tokens"], ex["log_sum_sq"], counts)
    for i, (p, r) in enumerate(pairs):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logp = lm64(input_ids=seq).logits[0].double().log_softmax(-1)
        pos = torch.arange(len(p), len(p) + len(r))
        terms = logp[pos - 1, seq[0, pos]] - torch.logsumexp(2 * logp[pos - 1], -1)
        assert float(got[i]) == pytest.approx(float(torch.exp(terms.mean())), rel=1e-5)
        # the per-token outputs with gradient agree with the sums
        assert float(ex["tokens"][i, :len(r)].detach().sum()) == pytest.approx(float(sums[i].detach()), abs=1e-5)
    assert not ex["log_sum_sq"].requires_grad


def test_wpo_multiplies_each_pair_loss_by_both_weights(tiny_lm):
    """batch_loss with --wpo equals dpo's pair loss times w_c * w_r, the weights recomputed by hand from the
    policy's own per-token log-probs and log sum p^2 (float64 from full logits)."""
    from prefpipe.data.cache import PAIRED
    from prefpipe.train.batches import collate_rows
    from prefpipe.train.config import LossConfig
    from prefpipe.train.batch_loss import batch_loss
    from prefpipe.train.parallel import Scorer

    t = pa.table({"row_id": ["a", "b"], "prompt_ids": [[1, 2], [3, 4, 5]], "chosen_ids": [[6, 7, 8], [9]],
                  "rejected_ids": [[10], [11, 12]], "ref_chosen": [-20.0, -7.0], "ref_rejected": [-6.0, -14.0],
                  "chosen_len": [3, 1], "rejected_len": [1, 2]})
    b = collate_rows(t, "pairs", 0, True)
    scorer = Scorer(tiny_lm)
    with torch.no_grad():
        plain = batch_loss(b, scorer, None, LossConfig(), torch.autocast("cpu", enabled=False))
        wpo = batch_loss(b, scorer, None, LossConfig(wpo=True), torch.autocast("cpu", enabled=False))
    w = {}
    for i, row in enumerate(t.to_pylist()):
        for resp in PAIRED.responses:
            seq = torch.tensor([row["prompt_ids"] + row[resp.ids]])
            with torch.no_grad():
                logp = tiny_lm(input_ids=seq).logits[0].double().log_softmax(-1)
            pos = torch.arange(len(row["prompt_ids"]), seq.shape[1])
            w[i, resp.name] = math.exp(float((logp[pos - 1, seq[0, pos]]
                                              - torch.logsumexp(2 * logp[pos - 1], -1)).mean()))
    for i in range(2):
        assert float(wpo.losses[i]) == pytest.approx(float(plain.losses[i]) * w[i, "chosen"] * w[i, "rejected"],
                                                     rel=1e-5)


# ---------------------------------------------------------------- training

def test_a_loss_needing_per_token_refuses_a_cache_without_them(run_cli, tiny_model, plain_cache, tmp_path):
    r = run_cli("train", "--model", tiny_model, "--cache", plain_cache, "--out", tmp_path / "runs",
                "--loss_type", "dpo", "--ld_alpha", "0.5", "--max_steps", "2", "--device", "cpu", "--no_progress")
    assert r.exit_code == 2
    assert "--per_token" in r.stderr + r.output and "dpo-beta0.1-ld0.5" in r.stderr + r.output
    assert not (tmp_path / "runs" / "dpo-beta0.1-ld0.5").exists()  # refused before anything trained


def test_train_ld_dpo_end_to_end(run_cli, tiny_model, pt_cache, tmp_path):
    out = tmp_path / "runs"
    r = run_cli("train", "--model", tiny_model, "--cache", pt_cache, "--out", out, "--loss_type", "dpo",
                "--ld_alpha", "0.5", "--max_steps", "2", "--batch_size", "4", "--lr", "1e-3", "--device", "cpu",
                "--dtype", "float32", "--no_progress")
    assert r.exit_code == 0, r.output + r.stderr
    assert "worst token" in r.output + r.stderr
    run = out / "dpo-beta0.1-ld0.5"
    steps = [json.loads(x) for x in (run / rundir.METRICS).read_text().splitlines()]
    train = [s for s in steps if s.get("split") == "train"]
    assert len(train) == 2
    # step 1 starts from the reference itself: LD-DPO's loss is ln 2 up to float32 numerics
    assert train[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)
    assert train[1]["loss"] != pytest.approx(math.log(2.0), abs=1e-6)  # the first step moved the policy
    assert json.loads((run / rundir.CONFIG).read_text())["loss"]["ld_alpha"] == 0.5


def test_ld_dpo_with_the_live_reference_starts_at_ln2(tiny_lm):
    """--reference live: the per-token reference comes from the frozen copy's forward; policy == reference gives
    ln 2 per pair, and alpha = 0 differs from alpha = 1 once the policy differs from the reference."""
    from prefpipe.train.batches import collate_rows
    from prefpipe.train.config import LossConfig
    from prefpipe.train.batch_loss import batch_loss
    from prefpipe.train.parallel import Scorer

    t = pa.table({"row_id": ["a", "b"], "prompt_ids": [[1, 2], [3, 4, 5]], "chosen_ids": [[6, 7, 8], [9]],
                  "rejected_ids": [[10], [11, 12]], "chosen_len": [3, 1], "rejected_len": [1, 2]})
    b = collate_rows(t, "pairs", 0, False)
    off = torch.autocast("cpu", enabled=False)
    ref = Scorer(copy.deepcopy(tiny_lm).eval())
    forwards = []
    ref.register_forward_hook(lambda *_: forwards.append(1))
    with torch.no_grad():
        out = batch_loss(b, Scorer(tiny_lm), ref, LossConfig(ld_alpha=0.0), off)
        assert torch.allclose(out.losses, torch.full((2,), math.log(2.0)), atol=1e-6)
        assert len(forwards) == 1  # the sums and the per-token values come from one reference forward
        moved = copy.deepcopy(tiny_lm)
        moved.get_output_embeddings().weight.add_(0.05 * torch.randn_like(moved.get_output_embeddings().weight))
        a0 = batch_loss(b, Scorer(moved), ref, LossConfig(ld_alpha=0.0), off).losses
        a1 = batch_loss(b, Scorer(moved), ref, LossConfig(ld_alpha=1.0), off).losses
        dpo = batch_loss(b, Scorer(moved), ref, LossConfig(), off).losses
    assert torch.equal(a1, dpo) and not torch.allclose(a0, a1)
