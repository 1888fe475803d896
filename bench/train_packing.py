"""Benchmark: padding-free (packed) training steps against padded ones, same pairs per step, cached reference.

Both layouts run the real `train_step` (DPO against cached reference sums, AdamW, clipping) on micro-batches
collated by the real `collate_rows` from the same rows, on preference-like lengths: prompt and response lengths
log-normal (prompt median 70 tokens, response median 80, sigma 0.8, clipped to [4, 700]), as in real preference
data, where a few long rows set the padded width of a batch. The model is a random Llama (hidden 512, 4 layers,
head_dim 64, vocab 32000 by default), float32 on CPU. Layouts alternate run by run so that drift in machine load
hits both; each run times `--steps` steps after one warm-up step, and the table shows the median of `--repeats`
runs.

Also printed: the time to collate one micro-batch (what a DataLoader worker would take off the training thread),
and model FLOPs utilisation: useful model FLOPs per step (matmuls on real tokens only: the decoder's linear
layers, causal attention over each sequence, the LM head on the scored response positions; backward = 2x forward)
over step time, divided by the float32 matmul peak measured in the same process with a large `torch.mm`.

    python bench/train_packing.py                # the numbers in RESULTS.md
    python bench/train_packing.py --device cuda --hidden 2048 --layers 16 --batch_size 16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time


def lengths(n: int, median: float, sigma: float, rng) -> list[int]:
    import math
    return [int(min(700, max(4, round(math.exp(rng.gauss(math.log(median), sigma)))))) for _ in range(n)]


def make_table(n: int, vocab: int, seed: int = 0):
    import random

    import pyarrow as pa
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(5, vocab) for _ in range(k)]  # noqa: E731
    p, c, r = lengths(n, 70, 0.8, rng), lengths(n, 80, 0.8, rng), lengths(n, 80, 0.8, rng)
    return pa.table({"prompt_ids": [ids(k) for k in p], "chosen_ids": [ids(k) for k in c],
                     "rejected_ids": [ids(k) for k in r],
                     "ref_chosen": [-3.0 * k for k in c], "ref_rejected": [-3.0 * k for k in r]})


def build_lm(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefpipe.attention import install as install_block_attention
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, head_dim=64, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).to(args.device)
    install_block_attention(lm)  # as `load_model` does for every sdpa model
    return lm


def model_flops(lm, batches) -> float:
    """Useful forward+backward matmul FLOPs of a step's micro-batches (real tokens only)."""
    c = lm.config
    linear = sum(p.numel() for n, p in lm.model.layers.named_parameters() if p.ndim == 2)
    total = 0.0
    for b in batches:
        lens = b.seq_lens if b.seq_lens is not None else b.mask.sum(-1)
        lens, plens = lens.double(), b.prompt_lens.double()
        tokens = float(lens.sum())
        attn = float((lens * (lens + 1) / 2).sum()) * 2 * 2 * c.num_attention_heads * c.head_dim * c.num_hidden_layers
        head = float((lens - plens).clamp(min=0).sum()) * 2 * c.hidden_size * c.vocab_size
        total += 3 * (2 * linear * tokens + attn + head)
    return total


def matmul_peak(device, n: int = 4096, reps: int = 3) -> float:
    import torch
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def one_run(policy, lm, table, steps: int, args, pack: bool, start: int) -> dict:
    import torch

    from prefpipe.dist import Procs
    from prefpipe.train.batches import collate_rows
    from prefpipe.train.config import LossConfig
    from prefpipe.train.step import train_step
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss_cfg = LossConfig(loss_type="dpo")
    times, collate_s, tokens, flops = [], [], 0, 0.0
    for k in range(steps + 1):  # step 0 warms up
        rows = list(range((start + k) * args.batch_size, (start + k + 1) * args.batch_size))
        t0 = time.perf_counter()
        batch = collate_rows(table.take(rows), "pairs", 0, True, pack=pack)
        collate_s.append(time.perf_counter() - t0)
        batch = batch.to(args.device)
        t0 = time.perf_counter()
        m = train_step(policy, opt, sched, [batch], loss_cfg, Procs(), max_grad_norm=1.0)
        if args.device.type == "cuda":
            torch.cuda.synchronize()
        if k:
            times.append(time.perf_counter() - t0)
            tokens += m["tokens"]
            flops += model_flops(lm, [batch])
    step = sum(times) / steps
    return {"step_s": step, "tokens_per_s": tokens / sum(times), "flops_per_s": flops / sum(times),
            "collate_ms": 1e3 * statistics.median(collate_s), "pairs": args.batch_size}


def main():
    import torch

    from prefpipe.dist import Procs
    from prefpipe.packing import choose_packing
    from prefpipe.train.parallel import wrap_policy
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch_size", type=int, default=8, help="pairs per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared 2-core VM)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    load = os.getloadavg()
    table = make_table(args.batch_size * (args.steps + 1) * args.repeats, args.vocab)
    lm = build_lm(args)
    lm.train()
    policy = wrap_policy(lm, Procs(), args.device, fsdp=False)
    assert choose_packing(policy, True, args.device), "this model should pack"
    peak = matmul_peak(args.device)
    res = {False: [], True: []}
    for rep in range(args.repeats):
        for pack in (False, True):  # the same rows for both layouts within a repeat
            res[pack].append(one_run(policy, lm, table, args.steps, args, pack, rep * (args.steps + 1)))
    cols = [table.column(k).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")]
    seq_lens = [len(p) + len(x) for p, c, r in zip(*cols) for x in (c, r)]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.device}, float32; load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# model hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M params; {args.batch_size} pairs per step; "
          f"sequence lengths median {statistics.median(seq_lens)}, max {max(seq_lens)}; matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'layout':8} {'step s':>8} {'tokens/s':>10} {'MFU':>7} {'collate ms':>11}  per-run step s")
    med = {}
    for pack in (False, True):
        rs = res[pack]
        med[pack] = {k: statistics.median(r[k] for r in rs) for k in ("step_s", "tokens_per_s", "flops_per_s",
                                                                        "collate_ms")}
        print(f"{'packed' if pack else 'padded':8} {med[pack]['step_s']:8.3f} {med[pack]['tokens_per_s']:10.1f} "
              f"{med[pack]['flops_per_s'] / peak:7.1%} {med[pack]['collate_ms']:11.2f}  "
              + " ".join(f"{r['step_s']:.3f}" for r in rs))
    print(f"speedup (padded step / packed step, medians): {med[False]['step_s'] / med[True]['step_s']:.2f}x")
    try:
        print("# " + subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    except OSError:
        pass


if __name__ == "__main__":
    main()
