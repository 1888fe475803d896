"""Benchmark: LoRA against a full fine-tune, each with `--reference cached` and `--reference live`, side by side.

Four modes on one model and one cache: `full-cached`, `full-live` (a frozen float32 copy scores every batch),
`lora-cached`, `lora-live` (the same model with its adapter disabled scores every batch; no second copy). Each
mode runs the real `run_training` loop in a fresh subprocess, so its peak RSS is its own; `--repeats` alternates
the modes so drift in machine load hits all of them. Per-step time is the median of the steps after `--warmup`,
then the median over repeats. Memory: peak RSS above the imports (CPU), or the CUDA peak (GPU).

What to expect: LoRA keeps gradients and AdamW moments only for the adapter (about 1% of the weights at rank 16),
so its memory is about one model copy plus activations, against four copies (weights, grads, 2 moments) for the
full fine-tune; the live reference costs one more copy for the full fine-tune and none for LoRA. Time: LoRA still
runs the full forward and the backward through the activations (only the weight gradients of the frozen layers
are skipped), so expect roughly 0.7-0.9x the full step; live adds one forward (about +1/3) in both.

    python bench/lora.py --threads 1           # CPU, float32: the numbers in RESULTS.md
    python bench/lora.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 32000 --batch_size 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_step import add_shared_args, current_rss_mb, machine, prepare, rss_mb, run_worker  # noqa: E402

MODES = ("full-cached", "full-live", "lora-cached", "lora-live")


def worker(args):
    """One mode in this fresh process; prints one JSON line."""
    import peft  # noqa: F401  (imported before the baseline, like transformers)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from prefpipe.train.config import LoopConfig, LoraConfig, OptimConfig, SourceConfig, TrainConfig
    from prefpipe.train.loop import run_training
    if args.threads:
        torch.set_num_threads(args.threads)
    base = current_rss_mb()
    kind, reference = args.worker.split("-")
    out = Path(args.workdir) / f"runs-{args.worker}-{os.getpid()}"
    cfg = TrainConfig(
        source=SourceConfig(model=args.model_dir, cache=args.cache_dir, reference=reference, drift_rows=4,
                            max_drift=1.0),
        out=str(out), optim=OptimConfig(lr=1e-5, warmup_ratio=0.0),
        loop=LoopConfig(batch_size=args.batch_size, max_steps=args.steps),
        lora=LoraConfig(lora_r=args.lora_r if kind == "lora" else 0),
        dtype=args.dtype, device=args.device, progress=False)
    summary = run_training(cfg)
    run = summary["runs"][0]
    steps = [json.loads(line) for line in (out / run["metrics"]).read_text().splitlines()]
    timed = [s for s in steps if s["split"] == "train"][args.warmup:]
    print("RESULT " + json.dumps({
        "mode": args.worker, "step_s": statistics.median(s["step_time_s"] for s in timed),
        "above_import_mb": rss_mb() - base, "cuda_peak_gb": run.get("peak_memory_gb")}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(ap)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the four modes")
    ap.add_argument("--lora_r", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker(args)

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="prefpipe-bench-lora-") as tmp:
        n_params = prepare(args, Path(tmp))
        results = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                results[mode].append(run_worker(args, mode, __file__, ("--lora_r", str(args.lora_r))))

    def med(mode, key):
        vals = [r[key] for r in results[mode] if r[key] is not None]
        return statistics.median(vals) if vals else None
    rows = {m: {k: med(m, k) for k in ("step_s", "above_import_mb", "cuda_peak_gb")} for m in MODES}
    print(f"machine: {machine(args)}; load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {n_params / 1e6:.1f}M "
          f"params ({n_params * 4 / 2 ** 20:.0f} MiB float32); {args.dtype} on {args.device}; batch "
          f"{args.batch_size} pairs; LoRA r {args.lora_r} all-linear; median of {args.steps - args.warmup} steps, "
          f"then of {args.repeats} runs per mode")
    head = f"{'mode':<12} {'step s':>8} {'x full-cached':>14} {'RSS above import MiB':>21} {'CUDA peak GiB':>14}"
    print(head)
    print("-" * len(head))
    ref = rows["full-cached"]["step_s"]
    for m in MODES:
        r = rows[m]
        cuda = f"{r['cuda_peak_gb']:.2f}" if r["cuda_peak_gb"] is not None else "-"
        print(f"{m:<12} {r['step_s']:>8.3f} {r['step_s'] / ref:>14.2f} {r['above_import_mb']:>21.0f} {cuda:>14}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args), "args": vars(args), "n_params": n_params,
                                               "results": results, "medians": rows}, indent=2))


if __name__ == "__main__":
    main()
