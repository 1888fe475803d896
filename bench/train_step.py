"""Benchmark: one training step with `--reference cached` against `--reference live`, same model, same batches.

Both modes run the real `run_training` loop (DPO, AdamW, clipping) on one cache written by the real
`run_precompute`. Each mode runs in a fresh subprocess, so its peak RSS is its own; `--repeats` alternates the
modes so that drift in machine load hits both. Per-step time is the median of the steps after `--warmup`.

What to expect: live = reference forward (F) + policy forward and backward (about 3F), cached = 3F, so about
0.75x the time; memory drops by one model copy (float32 weights) out of weights + gradients + 2 AdamW moments
+ activations, so about 0.8x of the model-related memory. The model is a random Llama with a byte-level BPE
tokenizer; `--vocab` widens the LM head beyond the tokenizer (extra rows are never targets) so the head costs what
a real vocabulary's does.

    python bench/train_step.py                                   # CPU, float32: the numbers in RESULTS.md
    python bench/train_step.py --device cuda --dtype bfloat16 --hidden 2048 --layers 16 --vocab 32000 \\
        --batch_size 8 --response_words 60
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the cat sat on a mat while seven quick foxes jumped over lazy dogs and birds sang songs of summer rain "
         "in gardens full of roses question answer plus minus times equals").split()


def build_model(out: Path, args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefpipe.tiny import build_tokenizer
    tok = build_tokenizer(out)
    cfg = LlamaConfig(vocab_size=max(args.vocab, len(tok)), hidden_size=args.hidden,
                      intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64, head_dim=64,
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def make_data(path: Path, n: int, args):
    """Word counts log-normal (sigma 0.8) around `--prompt_words` / `--response_words`, cut at 230 words: with
    this tokenizer's ~3 tokens per word, medians near 70 / 80 tokens and tails to ~700, like chat preference
    data."""
    import math
    rng = random.Random(0)

    def text(median):
        k = min(230, max(1, round(math.exp(rng.gauss(math.log(median), 0.8)))))
        return " ".join(rng.choice(WORDS) for _ in range(k))
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Q{i}: " + text(args.prompt_words),
                                "chosen": text(args.response_words),
                                "rejected": text(args.response_words)}) + "\n")


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    """Resident set size now, MiB (the peak can include transient import-time memory)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return rss_mb()


def worker(args):
    """One mode in this fresh process; prints one JSON line."""
    # Everything imported before the baseline RSS is read, so "above import" is what the run itself allocates.
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from prefpipe.train.config import LoopConfig, OptimConfig, SourceConfig, TrainConfig
    from prefpipe.train.loop import run_training
    if args.threads:
        torch.set_num_threads(args.threads)
    base = current_rss_mb()
    out = Path(args.workdir) / f"runs-{args.worker}-{os.getpid()}"
    cfg = TrainConfig(
        source=SourceConfig(model=args.model_dir, cache=args.cache_dir, reference=args.worker, drift_rows=4,
                            max_drift=1.0),
        out=str(out), optim=OptimConfig(lr=1e-6, warmup_ratio=0.0),
        loop=LoopConfig(batch_size=args.batch_size, max_steps=args.steps,
                        gradient_checkpointing=args.gradient_checkpointing),
        dtype=args.dtype, device=args.device, progress=False)
    summary = run_training(cfg)
    run = summary["runs"][0]
    steps = [json.loads(line) for line in (out / run["metrics"]).read_text().splitlines()]
    steps = [s for s in steps if s["split"] == "train"]
    timed = steps[args.warmup:]
    print("RESULT " + json.dumps({
        "mode": args.worker, "step_s": statistics.median(s["step_time_s"] for s in timed),
        "step_s_all": [round(s["step_time_s"], 4) for s in steps],
        "tokens_per_step": statistics.median(s["tokens"] for s in timed),
        "peak_rss_mb": rss_mb(), "baseline_rss_mb": base,
        "cuda_peak_gb": run.get("peak_memory_gb")}), flush=True)


def run_worker(args, mode: str, script: str = __file__, extra: tuple = ()) -> dict:
    """Run `script --worker mode` (this file, or `bench/lora.py`) in a fresh process with the shared options and
    `extra` arguments; its RESULT line as a dict."""
    cmd = [sys.executable, script, "--worker", mode, "--model_dir", args.model_dir, "--cache_dir", args.cache_dir,
           "--workdir", args.workdir, "--batch_size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--dtype", args.dtype, "--device", args.device, *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"worker {mode} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def add_shared_args(ap: argparse.ArgumentParser):
    """The options this bench and `bench/lora.py` share: model size, data, steps, and the worker plumbing."""
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch_size", type=int, default=2, help="pairs per step")
    ap.add_argument("--prompt_words", type=int, default=23, help="median prompt words (log-normal)")
    ap.add_argument("--response_words", type=int, default=27, help="median response words (log-normal)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the median")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker [default: torch's]")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write the results here")
    for hidden in ("--worker", "--model_dir", "--cache_dir", "--workdir"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)


def prepare(args, tmp: Path) -> int:
    """The model, the log-normal pairs and their precomputed cache under `tmp` (their paths go into `args`, for
    the workers); returns the model's parameter count."""
    from prefpipe.tokenizer import quiet_transformers
    from prefpipe.precompute.run import PrecomputeConfig, run_precompute
    quiet_transformers()
    args.workdir, args.model_dir, args.cache_dir = str(tmp), str(tmp / "model"), str(tmp / "cache")
    n_params = build_model(tmp / "model", args)
    make_data(tmp / "pairs.jsonl", args.batch_size * args.steps, args)
    run_precompute(PrecomputeConfig(model=args.model_dir, data=str(tmp / "pairs.jsonl"), out=args.cache_dir,
                                    dtype=args.dtype, device=args.device, max_length=4096,
                                    max_prompt_length=1024, progress=False))
    return n_params


def machine(args) -> str:
    import torch
    where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    if args.device.startswith("cuda"):
        where = f"{torch.cuda.get_device_name(0)} ({where})"
    threads = args.threads or torch.get_num_threads()
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{where}, {threads} torch threads{load}; torch {torch.__version__}; python {platform.python_version()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(ap)
    ap.add_argument("--repeats", type=int, default=2, help="alternating cached/live subprocess pairs")
    ap.add_argument("--gradient_checkpointing", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        return worker(args)

    t0 = time.perf_counter()
    extra = ("--gradient_checkpointing",) if args.gradient_checkpointing else ()
    with tempfile.TemporaryDirectory(prefix="prefpipe-bench-") as tmp:
        n_params = prepare(args, Path(tmp))
        results = {"cached": [], "live": []}
        for _ in range(args.repeats):
            for mode in ("cached", "live"):
                results[mode].append(run_worker(args, mode, extra=extra))

    def med(mode, key):
        vals = [r[key] for r in results[mode] if r[key] is not None]
        return statistics.median(vals) if vals else None

    rows = {m: {k: med(m, k) for k in ("step_s", "peak_rss_mb", "baseline_rss_mb", "cuda_peak_gb",
                                       "tokens_per_step")} for m in results}
    for r in rows.values():
        r["model_rss_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]
    ratio = {k: rows["cached"][k] / rows["live"][k] for k in ("step_s", "peak_rss_mb", "model_rss_mb", "cuda_peak_gb")
             if rows["cached"][k] and rows["live"][k]}
    # Both modes see the same batches in the same order, so step i of a cached run pairs with step i of the live
    # run of the same repeat; the median of those ratios is less sensitive to batch-length variation.
    paired = [c / l for rc, rl in zip(results["cached"], results["live"])
              for c, l in zip(rc["step_s_all"][args.warmup:], rl["step_s_all"][args.warmup:])]
    ratio["paired_step"] = statistics.median(paired)
    print(f"machine: {machine(args)}")
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {n_params / 1e6:.1f}M "
          f"params ({n_params * 4 / 2 ** 20:.0f} MiB float32); {args.dtype} on {args.device}; batch {args.batch_size}"
          f" pairs, {rows['cached']['tokens_per_step']:.0f} tokens/step; median of {args.steps - args.warmup} steps"
          f" x {args.repeats} run(s); gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")
    head = f"{'reference':<10} {'step s':>8} {'peak RSS MiB':>13} {'above import MiB':>17} {'CUDA peak GiB':>14}"
    print(head)
    print("-" * len(head))
    for m in ("cached", "live"):
        r = rows[m]
        cuda = f"{r['cuda_peak_gb']:.2f}" if r["cuda_peak_gb"] is not None else "-"
        print(f"{m:<10} {r['step_s']:>8.3f} {r['peak_rss_mb']:>13.0f} {r['model_rss_mb']:>17.0f} {cuda:>14}")
    cuda = f"{ratio['cuda_peak_gb']:.3f}" if "cuda_peak_gb" in ratio else "-"
    print(f"{'ratio':<10} {ratio['step_s']:>8.3f} {ratio['peak_rss_mb']:>13.3f} {ratio['model_rss_mb']:>17.3f} "
          f"{cuda:>14}")
    print(f"per-step paired time ratio (median of {len(paired)}): {ratio['paired_step']:.3f}")
    states = n_params * 4 / 2 ** 20
    print(f"(cached / live; floor about 0.75 for time and one float32 model copy less memory: model states "
          f"{4 * states:.0f} MiB (weights, grads, 2 AdamW moments) against {5 * states:.0f} MiB, 0.8x) "
          f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args), "args": vars(args), "n_params": n_params,
                                               "results": results, "medians": rows, "ratios": ratio}, indent=2))


if __name__ == "__main__":
    main()
