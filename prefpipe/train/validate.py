"""Cache validation before step 1: tokenizer, model, and the step-0 drift.

- **Tokenizer.** The cache's tokenizer fingerprint must equal the policy's, or training stops and names the
  components that differ (vocab, special tokens, chat template, pipeline). Ids from another tokenizer would
  train on garbage.
- **Model.** When the reference log-probs are used, the cache's model fingerprint must equal the fingerprint of
  `--model`; `--allow_reference_mismatch` turns that into a warning (training a second stage against an older
  reference, say).
- **Drift.** Before the first step the policy scores a sample of `--drift_rows` cached rows, and the mean absolute
  difference per response token between its log-probs and the cached reference is logged. Above `--max_drift`
  (default 0.1 nats per token) training stops: a wrong model, template or truncation shows up here as whole nats,
  while the same model in float32 drifts by about 1e-6 and a bf16 cache against a float32 policy by a few
  hundredths. With `--allow_reference_mismatch` the drift is only logged. A `--per_token` cache also gives the
  worst single token (largest |policy - cached| log-prob, with its row id, response and position), which points at
  the first token a template or truncation difference changes.
- **Per-token reference.** A run that needs per-token reference log-probs (LD-DPO: `--ld_alpha`) refuses a cache
  written without `precompute --per_token` before anything trains.
"""

from __future__ import annotations

import torch

from prefpipe.data.cache import KINDS
from prefpipe.data.identity import model_mismatch, tokenizer_mismatch
from prefpipe.data.mapped import take_rows
from prefpipe.errors import UserError
from prefpipe.scoring import rows_budget, score_cache_rows, score_sequences
from prefpipe.wording import plural


def check_tokenizer(data, tokenizer) -> str:
    if not (data.metadata or {}).get("tokenizer"):
        raise UserError("the cache records no tokenizer fingerprint; rerun precompute", file=data.origin)
    diff = tokenizer_mismatch(data.metadata, tokenizer)
    if diff:
        raise UserError(f"the cache was tokenized with a different tokenizer than --model's ({', '.join(diff)} "
                        "differ); its ids would mean other tokens. Precompute the cache with this model's "
                        "tokenizer", file=data.origin)
    return "match"


def check_model(data, model_dir, allow_mismatch: bool, log) -> str:
    cached = (data.metadata or {}).get("model") or {}
    actual = model_mismatch(data.metadata or {}, model_dir)
    if actual is None:
        return "match"
    msg = (f"the cache's reference log-probs come from another model ({cached.get('path')}, fingerprint "
           f"{str(cached.get('fingerprint'))[:12]}) than --model {model_dir} (fingerprint {actual[:12]})")
    if not allow_mismatch:
        raise UserError(msg + "; precompute a cache for this model, or pass --allow_reference_mismatch to train "
                        "against it anyway", file=data.origin)
    log(f"warning: {msg}; continuing because of --allow_reference_mismatch")
    return "mismatch (allowed)"


def check_per_token(data, runs, reference: str):
    """Stop before training when a run needs per-token reference log-probs that the cache does not hold."""
    needing = sorted({r.run_name for r in runs if r.needs_per_token_reference})
    if needing and reference == "cached" and not data.has_per_token:
        raise UserError(f"{', '.join(needing)} needs per-token reference log-probs, which this cache lacks; "
                        "precompute it again with --per_token (or use --reference live)", file=data.origin)


def sample_rows(n: int, k: int) -> list[int]:
    """A fixed sample of k row indices (the same for every run and seed)."""
    g = torch.Generator().manual_seed(20240229)
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def measure_drift(scorer, data, rows: list[int], batch_size: int, pad_id: int, device, autocast) -> dict:
    """Mean |policy - cached reference| per response token over `rows`, and the worst sequence's per-token value.

    Every response of the sampled rows (chosen and rejected; a KTO completion and its partner) is scored after the
    row's prompt by `scorer`, called through its own forward so DDP/FSDP wrappers see it. A forward holds at most
    the padded tokens of `batch_size` rows, all their responses at the sample's longest, without gradients: less
    memory than one training micro-batch. Every process
    scores the same rows in the same batches (FSDP ranks must run forwards together), so no reduction is needed."""
    spec = KINDS[data.kind]
    t = take_rows(data.table, rows)  # Table.take would read the whole (mapped) cache for these few rows
    per_token = all(r.tokens in t.column_names for r in spec.responses)

    def score(prompts, responses):
        budget = rows_budget(batch_size, len(spec.responses), [len(p) + len(r) for p, r in zip(prompts, responses)])
        return score_sequences(scorer, prompts, responses, batch_tokens=budget, pad_id=pad_id, device=device,
                               per_token=per_token)
    with autocast:
        got = score_cache_rows(lambda c: t.column(c).to_pylist(), data.kind, score)
    sums = [x for r in spec.responses for x in got[r.name].sums]
    counts = [x for r in spec.responses for x in got[r.name].counts]
    refs = [x for r in spec.responses for x in t.column(r.ref).to_pylist()]
    diffs = [abs(s - ref) for s, ref in zip(sums, refs)]
    worst = max((d / max(c, 1) for d, c in zip(diffs, counts)), default=0.0)
    total_tokens = sum(counts)
    out = {"mean_abs_per_token": sum(diffs) / max(total_tokens, 1), "worst_row_per_token": worst,
           "rows": len(rows), "tokens": total_tokens}
    if per_token:
        cached = [x for r in spec.responses for x in t.column(r.tokens).to_pylist()]
        labels = [(rid, r.name) for r in spec.responses for rid in t.column("row_id").to_pylist()]
        out["worst_token"] = _worst_token([x for r in spec.responses for x in got[r.name].tokens], cached, labels)
    return out


def _worst_token(policy: list, cached: list, labels: list) -> dict | None:
    """The largest |policy - cached| per-token log-prob: its size, row id, response and 0-based position in the
    response."""
    best = None
    for pol, ref, (row_id, response) in zip(policy, cached, labels):
        if not len(ref):
            continue
        d = (pol.double() - torch.tensor(ref, dtype=torch.float64)).abs()
        pos = int(d.argmax())
        if best is None or float(d[pos]) > best["abs_diff"]:
            best = {"abs_diff": float(d[pos]), "row_id": row_id, "response": response, "position": pos}
    return best


def judge_drift(drift: dict, max_drift: float, allow_mismatch: bool, origin: str, log):
    d = drift["mean_abs_per_token"]
    w = drift.get("worst_token")
    worst_token = (f"; worst token {w['abs_diff']:.3g} (row {w['row_id']}, {w['response']}, position "
                   f"{w['position']})" if w else "")
    log(f"step-0 drift: {d:.3g} nats per response token between the policy and the cached reference "
        f"({plural(drift['rows'], 'row')}, {plural(drift['tokens'], 'token')}; "
        f"worst row {drift['worst_row_per_token']:.3g}"
        f"{worst_token}; limit --max_drift {max_drift:g})")
    if d > max_drift:
        msg = (f"at step 0 the policy's log-probs differ from the cached reference by {d:.3g} nats per token "
               f"(limit {max_drift:g}): the cache was made with another model, dtype, template or truncation")
        if not allow_mismatch:
            raise UserError(msg + ". Precompute the cache again for this model, raise --max_drift, or pass "
                            "--allow_reference_mismatch", file=origin)
        log(f"warning: {msg}; continuing because of --allow_reference_mismatch")
