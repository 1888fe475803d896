"""KTO caches: pinned mismatched partners (never self, another prompt), their truncation and their log-probs."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import make_pairs, make_unpaired, write_jsonl
from prefpipe.data.cache import read_cache
from prefpipe.modeling import load_model
from prefpipe.data.kto_pairs import assign_partners
from test_precompute_backend import naive_float64


def test_partner_rule_by_hand():
    A, B, C = [1, 5], [1, 6], [2]
    # Groups in order of appearance: A=[0,1], B=[2], C=[3,4,5]; each takes from the next group, C wraps to A.
    assert assign_partners([A, A, B, C, C, C]) == [2, 2, 3, 0, 1, 0]
    assert assign_partners([A, A, A]) == [1, 2, 0]  # one prompt: the next example, cyclically
    assert assign_partners([A, B, C]) == [1, 2, 0]
    with pytest.raises(ValueError):
        assign_partners([A])


@pytest.mark.parametrize("seed", range(20))
def test_partner_rule_never_self_and_other_prompt(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 17)  # odd sizes included: a reversal would map the middle row to itself
    prompts = [[rng.randint(0, rng.choice([1, 3, 9]))] for _ in range(n)]
    partners = assign_partners(prompts)
    assert len(partners) == n and all(0 <= k < n for k in partners)
    assert all(k != j for j, k in enumerate(partners))
    if len({tuple(p) for p in prompts}) > 1:
        assert all(prompts[k] != prompts[j] for j, k in enumerate(partners))
    assert assign_partners(prompts) == partners  # deterministic


def check_partners(t: dict, max_length: int, part_of: dict):
    """Every kl column against the partner row's own columns; returns the number of cut partner completions."""
    by_id = {rid: i for i, rid in enumerate(t["row_id"])}
    cut = 0
    for j in range(len(t["row_id"])):
        k = by_id[t["kl_row_id"][j]]
        assert k != j
        assert t["prompt_ids"][k] != t["prompt_ids"][j]
        budget = max_length - len(t["prompt_ids"][j])
        assert t["kl_completion_ids"][j] == t["completion_ids"][k][:budget]
        cut += len(t["completion_ids"][k]) > budget
        assert part_of[k] == part_of[j] or part_of[j] == max(part_of.values())  # only the last part borrows
    return cut


def test_unpaired_cache_with_borrowed_partner(tmp_path, run_cli, tiny_model):
    data = write_jsonl(tmp_path / "u.jsonl", make_unpaired(13, seed=2, max_words=40))
    out = tmp_path / "k"
    res = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", out, "--part_rows", "4",
                  "--max_length", "48", "--max_prompt_length", "20", "--no_progress")
    assert res.exit_code == 0, res.output
    cache = read_cache(out)
    assert cache.kind == "unpaired" and cache.metadata["kto"]["source"] == "unpaired"
    t = cache.table.to_pydict()
    assert t["label"] == [i % 3 != 0 for i in range(13)]
    part_of = {i: i // 4 for i in range(13)}  # parts of 4, 4, 4, 1
    cut = check_partners(t, 48, part_of)
    c = cache.metadata["counts"]
    assert c["kl_borrowed"] == 1 and c["kl_truncated"] == cut > 0
    assert t["kl_row_id"][12] in t["row_id"][8:12]  # the lone last example borrowed from the part before
    assert t["completion_len"] == [len(x) for x in t["completion_ids"]]
    model64 = load_model(str(tiny_model), dtype=torch.float64).eval()
    rows = [0, 5, 12]
    P = [t["prompt_ids"][i] for i in rows]
    want = naive_float64(model64, P + P, [t["completion_ids"][i] for i in rows] +
                         [t["kl_completion_ids"][i] for i in rows])
    got = [t["ref_logp"][i] for i in rows] + [t["ref_kl"][i] for i in rows]
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-6 * abs(w) + 1e-5


def test_paired_data_under_kto(tmp_path, run_cli, tiny_model):
    data = write_jsonl(tmp_path / "p.jsonl", make_pairs(7, seed=4))
    base = ["precompute", "--model", tiny_model, "--data", data, "--part_rows", "4", "--no_progress"]
    assert run_cli(*base, "--out", tmp_path / "dpo").exit_code == 0
    res = run_cli(*base, "--out", tmp_path / "kto", "--kto")
    assert res.exit_code == 0, res.output
    dpo = read_cache(tmp_path / "dpo").table.to_pydict()
    kto = read_cache(tmp_path / "kto")
    t = kto.table.to_pydict()
    assert kto.kind == "unpaired" and kto.metadata["kto"]["source"] == "paired"
    assert kto.metadata["counts"]["rows_written"] == 14 and kto.metadata["counts"]["rows_read"] == 7
    assert t["row_id"] == [f"{r}:{s}" for r in dpo["row_id"] for s in ("chosen", "rejected")]
    assert t["label"] == [True, False] * 7
    assert t["completion_ids"][0::2] == dpo["chosen_ids"] and t["completion_ids"][1::2] == dpo["rejected_ids"]
    # Same model, same ids: the KTO run's own-completion scores are the DPO run's.
    for a, b in zip(t["ref_logp"], [x for pair in zip(dpo["ref_chosen"], dpo["ref_rejected"]) for x in pair]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b) / 100)
    # Never the same pair's other response: the partner's prompt differs.
    check_partners(t, 1024, {i: i // 8 for i in range(14)})


def test_single_prompt_block_and_first_block_alone(tmp_path, run_cli, tiny_model):
    rows = [{"prompt": "Q: same", "completion": f"answer {w}", "label": i % 2 == 0}
            for i, w in enumerate(["one", "two", "three"])]
    data = write_jsonl(tmp_path / "same.jsonl", rows)
    res = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", tmp_path / "s", "--no_progress")
    assert res.exit_code == 0, res.output
    t = read_cache(tmp_path / "s").table.to_pydict()
    assert t["kl_row_id"] == [t["row_id"][1], t["row_id"][2], t["row_id"][0]]

    res = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", tmp_path / "one",
                  "--part_rows", "1", "--no_progress")
    assert res.exit_code == 2 and "--part_rows" in res.output and "single" in res.output
