"""`prefpipe precompute --verify K`: rescore K random cached rows with a plain float32 transformers forward.

Run it before trusting a cache, above all a bf16 cache from vLLM. Decisions a user may want to know:

- **What is compared.** The cache stores one summed log-prob per response, so verify compares sums. For each of
  the K rows, both responses are rescored (chosen and rejected; for KTO the completion and the pinned mismatched
  partner), so 2K sequences. The reference is `sequence_logprobs` in float32, its per-token values summed in
  float64, from the cached ids (nothing is re-tokenized).
- **Per sum** is `|cached sum - rescored sum|`. **Per token** is that difference divided by the sequence's
  response tokens, the mean drift per token. Errors of opposite sign cancel inside a sum, so a single token can
  be off by more; verify does not rescore with the cache's engine to measure that, because what training consumes
  is the sum.
- **Tolerances** depend on the dtype the cache was scored in (its metadata). Every rescored sequence must meet
  both limits:

      cache dtype          per token   per sum
      float32              1e-3        0.05
      bfloat16, float16    0.05        2.0

  Float32 engines agree to about 1e-6 per token and 1e-4 per sum on our tests; the float32 limits leave room for
  GPU kernels and long sequences while a different checkpoint misses them by orders of magnitude. bf16 scoring is
  expected to drift (about 6e-4 nats per token, depending on batching), so its limits only catch gross errors;
  the measured drift is printed.
- **Identity.** The model's weights fingerprint and the tokenizer's fingerprint must match the ones the cache
  recorded; a mismatch fails verify even when the numbers happen to agree.
- **Failure** is a one-line error (exit status 2) naming the worst sequence; the cache itself is left in place.
- Rows are drawn with `random.Random(seed)`; K larger than the cache checks every row.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from prefpipe.data.cache import KINDS, read_cache
from prefpipe.data.identity import model_mismatch, tokenizer_mismatch
from prefpipe.errors import UserError
from prefpipe.model_paths import resolve_model_dir
from prefpipe.tokenizer import load_tokenizer, quiet_transformers

VERIFY_BATCH_TOKENS = 8192


@dataclass(frozen=True)
class Tolerance:
    per_token: float
    per_sum: float


TOLERANCES = {
    "float32": Tolerance(per_token=1e-3, per_sum=0.05),
    "bfloat16": Tolerance(per_token=0.05, per_sum=2.0),
    "float16": Tolerance(per_token=0.05, per_sum=2.0),
}

class VerifyFailed(UserError):
    """Verify ran and the cache missed a tolerance or an identity check; `report` holds every number."""

    def __init__(self, message: str, report: dict, file: str):
        self.report = report
        super().__init__(message, file=file)


def _sequences(sub: dict, kind: str) -> list[dict]:
    """Each response of the sampled rows (`sub`, their columns), response by response as `_rescore` scores them."""
    return [{"row_id": sub["row_id"][i], "response": r.name, "ids": sub[r.ids][i], "cached": sub[r.ref][i],
             "cached_len": sub[r.length][i] if r.length else None}
            for r in KINDS[kind].responses for i in range(len(sub["row_id"]))]


def _rescore(model, sub: dict, kind: str, device) -> list[tuple[float, int]]:
    """Float64 sums (math.fsum) of float32 per-token log-probs, in `_sequences` order."""
    from prefpipe.scoring import score_cache_rows, score_sequences  # torch, as verify_cache's imports

    got = score_cache_rows(sub.__getitem__, kind, lambda p, r: score_sequences(
        model, p, r, batch_tokens=VERIFY_BATCH_TOKENS, per_token=True, device=device))
    return [(math.fsum(t.double().tolist()), n) for r in KINDS[kind].responses
            for t, n in zip(got[r.name].tokens, got[r.name].counts)]


def _identity(cache_meta: dict, model: str) -> dict:
    model_dir = str(resolve_model_dir(model))
    tok_diff = tokenizer_mismatch(cache_meta, load_tokenizer(model_dir))
    return {"model_matches": model_mismatch(cache_meta, model_dir) is None,
            "tokenizer_matches": not tok_diff, "tokenizer_differs_in": tok_diff}


def verify_cache(cache_dir: str, model: str, k: int, *, seed: int = 0, device: str = "auto") -> dict:
    """Rescore `k` random rows of the cache at `cache_dir` with `model` in float32; raise `VerifyFailed` (a
    `UserError`) when a tolerance or an identity check fails, else return the report."""
    import torch

    import transformers

    from prefpipe.modeling import load_model, resolve_device

    if k < 1:
        raise UserError(f"--verify needs a positive number of rows (got {k})")
    quiet_transformers()
    cache = read_cache(cache_dir)
    if not cache.has_reference:
        raise UserError("the cache has no reference log-probs to verify (it was written with --no_reference)",
                        file=str(cache_dir))
    backend = cache.metadata.get("backend", {})
    dtype = backend.get("dtype", "float32")
    if dtype not in TOLERANCES:
        raise UserError(f"the cache records dtype {dtype!r}, which verify has no tolerance for",
                        file=str(cache_dir))
    tol = TOLERANCES[dtype]
    n_rows = cache.table.num_rows
    rows = sorted(random.Random(seed).sample(range(n_rows), min(k, n_rows)))
    sub = cache.table.take(rows).to_pydict()
    seqs = _sequences(sub, cache.kind)

    identity = _identity(cache.metadata, model)
    dev = resolve_device(device)
    lm = load_model(model, torch.float32, dev).eval()
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a TF32 reference would itself drift by about 1e-3
    try:
        rescored = _rescore(lm, sub, cache.kind, dev)
    finally:
        torch.set_float32_matmul_precision(precision)
        del lm
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    per_sum, per_token, failing, worst = [], [], 0, None
    for s, (value, count) in zip(seqs, rescored):
        if count != len(s["ids"]) or (s["cached_len"] is not None and s["cached_len"] != count):
            raise UserError(f"row {s['row_id']} ({s['response']}): the cache records {s['cached_len']} response "
                            f"tokens, {len(s['ids'])} ids, and {count} were scored; the cache is inconsistent",
                            file=str(cache_dir))
        d = abs(s["cached"] - value)
        per_sum.append(d)
        per_token.append(d / count)
        bad = d > tol.per_sum or d / count > tol.per_token
        failing += bad
        if worst is None or d / count > worst["per_token"]:
            worst = {"row_id": s["row_id"], "response": s["response"], "cached": s["cached"], "rescored": value,
                     "tokens": count, "per_token": d / count, "per_sum": d}

    report = {
        "passed": failing == 0 and identity["model_matches"] and identity["tokenizer_matches"],
        "rows": len(rows), "sequences": len(seqs), "seed": seed,
        "cache": {"backend": backend.get("name"), "version": backend.get("version"), "dtype": dtype},
        "reference": {"engine": "transformers", "version": transformers.__version__, "dtype": "float32",
                      "device": dev.type},
        "per_token": {"max": max(per_token), "mean": sum(per_token) / len(per_token)},
        "per_sum": {"max": max(per_sum), "mean": sum(per_sum) / len(per_sum)},
        "tolerance": asdict(tol), "failing": failing, "worst": worst, **identity,
    }
    if not report["passed"]:
        raise VerifyFailed(_failure_line(report), report, str(cache_dir))
    return report


def _failure_line(r: dict) -> str:
    reasons = []
    if r["failing"]:
        w, t = r["worst"], r["tolerance"]
        reasons.append(
            f"{r['failing']} of {r['sequences']} rescored sequences drift beyond the {r['cache']['dtype']} "
            f"tolerance (per token max {r['per_token']['max']:.3g}, limit {t['per_token']:g}; per sum max "
            f"{r['per_sum']['max']:.3g}, limit {t['per_sum']:g}); worst: row {w['row_id']} {w['response']}, "
            f"cached {w['cached']:.6g}, float32 forward {w['rescored']:.6g} over {w['tokens']} tokens")
    if not r["model_matches"]:
        reasons.append("the model's weights differ from the ones that made the cache")
    if not r["tokenizer_matches"]:
        reasons.append(f"the tokenizer differs from the cache's ({', '.join(r['tokenizer_differs_in'])})")
    return "verify failed: " + "; ".join(reasons)
