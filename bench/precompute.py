"""Benchmark: the hf backend (prompt once, the default), its old path (each response in its own forward) and a
naive scorer, same model and data, same invocation.

The naive baseline is what a first implementation does: fixed batches of `--baseline_batch` rows in input order,
right-padded to the longest row, a full forward that returns `[B, T, vocab]` logits, and a float32 log-softmax
over the whole vocabulary. Ours sorts by length into `--batch_tokens` budgets and projects only response
positions, in chunks; `prompt_once` also runs each prompt once for both responses (`score_pairs`), `old` runs
the prompt once per response (`--no_prompt_once`). Tokens are counted the same way for all three: prompt +
response per scored response (so a prompt counts twice per pair, as the separate forwards process it). MFU is the
model FLOPs of that work (2 x non-embedding parameters per token, the attention score and value products, the LM
head on response positions only) per second, over the float32 matmul rate measured in the same invocation.

Every measurement runs in a fresh subprocess, so one configuration's peak RSS cannot hide another's; speed runs
alternate ours/baseline so that drift in machine load hits both. Data are random token ids with log-normal
(skewed) prompt and response lengths like chat preference data (prompt median 70, responses median 80, tails
cut at 700). Usage:

    python bench/precompute.py                      # CPU, float32, the numbers in bench/RESULTS.md
    python bench/precompute.py --device cuda --dtype bfloat16 --layers 8 --hidden 1024 --pairs 512
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import platform
import resource
import statistics
import subprocess
import sys
import time


def make_data(pairs: int, vocab: int, seed: int, max_len: int):
    import numpy as np
    rng = np.random.default_rng(seed)
    # Log-normal lengths as in chat preference data: prompt median ~70, responses ~80, long tails to ~700.
    tail = min(700, max_len // 2)
    p_len = np.clip(rng.lognormal(np.log(70), 0.8, pairs), 4, tail).astype(int)
    prompts, chosen, rejected = [], [], []
    for i in range(pairs):
        prompts.append(rng.integers(0, vocab, p_len[i]).tolist())
        for out in (chosen, rejected):
            n = int(np.clip(rng.lognormal(np.log(80), 0.8), 2, min(tail, max_len - p_len[i])))
            out.append(rng.integers(0, vocab, n).tolist())
    return prompts, chosen, rejected


def model_flops(model, prompts, chosen, rejected) -> float:
    """Useful forward FLOPs of scoring every response after its prompt (counted alike for all methods)."""
    cfg = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    flops = 0.0
    for p, a, b in zip(prompts, chosen, rejected):
        for r in (a, b):
            n = len(p) + len(r)
            # 2 FLOPs per weight per token; QK^T and AV: 2 x 2 x attn x (n^2 / 2) per layer; the head on r only
            flops += 2 * body * n + 2 * cfg.num_hidden_layers * attn * n * n + 2 * cfg.hidden_size * cfg.vocab_size * len(r)
    return flops


def matmul_peak(threads: int, size: int = 1024, reps: int = 8) -> float:
    """Best float32 matmul FLOP/s of `reps` tries at this moment (the MFU denominator)."""
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t))
    return best


def build(args, vocab):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # the same weights in every subprocess
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, head_dim=64, max_position_embeddings=2048)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    with torch.device(args.device):  # initialise in place: a GPU builds a large model in a blink
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=dtype).eval()


def naive_score(model, prompts, responses, batch, device):
    """Fixed batches in input order, padded to the longest, full-vocabulary float32 log-softmax."""
    import torch
    sums = []
    with torch.inference_mode():
        for s in range(0, len(prompts), batch):
            seqs = [p + r for p, r in zip(prompts[s:s + batch], responses[s:s + batch])]
            width = max(map(len, seqs))
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, q in enumerate(seqs):
                ids[i, :len(q)] = torch.tensor(q)
                mask[i, :len(q)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            tok = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            for i, p in enumerate(prompts[s:s + batch]):
                n = len(seqs[i])
                sums.append(tok[i, len(p) - 1:n - 1].sum().item())
    return sums


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    prompts, chosen, rejected = make_data(args.pairs, args.vocab, 0, args.max_len)
    P, R = prompts + prompts, chosen + rejected
    tokens = sum(len(p) + len(r) for p, r in zip(P, R))
    model = build(args, args.vocab)
    cuda = args.device.startswith("cuda")
    if args.method in ("ours", "old"):
        from prefpipe.precompute.backend import BackendOptions
        from prefpipe.precompute.hf_backend import HFBackend
        be = HFBackend(BackendOptions("bench", dtype=args.dtype, device=args.device, batch_tokens=args.batch_tokens,
                                      prompt_once=args.method == "ours"), model=model)
        assert be.prompt_once == (args.method == "ours")

        def run(p, r):
            half = len(p) // 2  # p is prompts + prompts: score_pairs takes each prompt once
            return be.score_pairs(p[:half], r[:half], r[half:])[0]
    else:
        def run(p, r):
            return naive_score(model, p, r, args.baseline_batch, args.device)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights_cuda = torch.cuda.memory_allocated() / 2 ** 20 if cuda else 0.0
    run(P[:2] + P[:2], R[:2] + R[len(prompts):len(prompts) + 2])  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    sums = run(P, R)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    out = {"method": args.method, "vocab": args.vocab, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "flops_per_s": model_flops(model, prompts, chosen, rejected) / wall,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mb": rss_loaded,
           "checksum": sum(sums[:8])}
    if cuda:
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        out["cuda_after_load_mb"] = weights_cuda
    print("RESULT " + json.dumps(out))


def spawn(args, method, vocab, pairs):
    cmd = [sys.executable, __file__, "--child", "--method", method, "--vocab", str(vocab), "--pairs", str(pairs)]
    for k in ("hidden", "layers", "device", "dtype", "batch_tokens", "baseline_batch", "max_len", "threads"):
        cmd += [f"--{k}", str(getattr(args, k))]
    root = str(Path(__file__).resolve().parent.parent)  # prefpipe importable without an install
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{method} vocab={vocab} failed:\n{res.stderr[-3000:]}")
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[7:])
    print(json.dumps(r), flush=True)
    return r


def machine(args) -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__}, {args.threads} threads"
    if args.device.startswith("cuda"):
        desc += f", {torch.cuda.get_device_name()}"
    return desc + f", load average before {os.getloadavg()[0]:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="ours")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--vocabs", default="32000,150000", help="first: speed runs; all: memory runs")
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--memory_pairs", type=int, default=8, help="pairs for the large-vocabulary memory runs (0: none)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch_tokens", type=int, default=16384)
    ap.add_argument("--baseline_batch", type=int, default=8)
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.child:
        return child(args)

    print("machine:", machine(args), flush=True)
    vocabs = [int(v) for v in args.vocabs.split(",")]
    methods = ("ours", "old", "naive")
    speed = {m: [] for m in methods}
    peaks = [matmul_peak(args.threads)]
    for _ in range(args.reps):
        for method in methods:
            speed[method].append(spawn(args, method, vocabs[0], args.pairs))
    peaks.append(matmul_peak(args.threads))
    peak = max(peaks)
    mem = {(m, v): spawn(args, m, v, args.memory_pairs) for v in vocabs for m in ("ours", "naive")
           if args.memory_pairs > 0}

    med = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in speed.items()}
    cs = {m: rs[0]["checksum"] for m, rs in speed.items()}
    print()
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {args.dtype} on {args.device}; "
          f"batch_tokens {args.batch_tokens}, baseline batch {args.baseline_batch}")
    print(f"speed, vocab {vocabs[0]}, {args.pairs} pairs ({speed['ours'][0]['tokens']} tokens), "
          f"median of {args.reps}:")
    for m in methods:
        runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in speed[m])
        mfu = statistics.median(r["flops_per_s"] for r in speed[m]) / peak
        print(f"  {m:6} {med[m]:9.0f} tokens/s  {med[m] / med['naive']:5.2f}x naive  MFU {100 * mfu:5.1f}%  "
              f"(runs: {runs})")
    print(f"  (ours = prompt once, old = each response in its own forward; MFU over a float32 matmul peak of "
          f"{peak / 1e9:.1f} GFLOP/s, best of before/after: {', '.join(f'{p / 1e9:.1f}' for p in peaks)})")
    print("  checksums of 8 scores: " + ", ".join(f"{m} {cs[m]:.3f}" for m in methods))
    print(f"  load average after: {os.getloadavg()}")
    if not mem:
        return
    print(f"memory, {args.memory_pairs} pairs:")
    key = "peak_cuda_mb" if args.device.startswith("cuda") else "peak_rss_mb"
    for v in vocabs:
        for m in ("ours", "naive"):
            r = mem[(m, v)]
            extra = r[key] - r["cuda_after_load_mb" if key == "peak_cuda_mb" else "rss_after_load_mb"]
            print(f"  vocab {v:>6} {m:6} {key} {r[key]:8.0f}   above the loaded model {extra:8.0f} MB")


if __name__ == "__main__":
    main()
