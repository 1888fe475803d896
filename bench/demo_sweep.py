"""Measure the demo's gain over seeds (and tune it): SFT + pairs once per (seed, SFT steps), then the pipeline
once per learning rate, many jobs in parallel. Writes sweep.json and prints mean ± std per run over seeds.

    python bench/demo_sweep.py --out /tmp/sweep --seeds 0,1,2 --lrs 1e-4 --jobs 2 --threads 1

Each job is the same code `prefpipe demo` runs (prefpipe.demo.run); only sizes and the learning rate vary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path


def settings(args, seed, steps, lr=None, out="."):
    from prefpipe.demo.run import DemoSettings

    s = DemoSettings(out=out, seed=seed, device=args.device)
    s = replace(s, sft=replace(s.sft, steps=steps, seed=seed), pairs=replace(s.pairs, seed=seed))
    if args.target_accuracy is not None:
        s = replace(s, sft=replace(s.sft, target_accuracy=args.target_accuracy or None))
    if args.betas:
        s = replace(s, betas=tuple(float(b) for b in args.betas.split(",")))
    if args.epochs:
        s = replace(s, epochs=args.epochs)
    if args.n_pair_questions:
        s = replace(s, n_pair_questions=args.n_pair_questions)
    if args.batch_size:
        s = replace(s, batch_size=args.batch_size)
    if args.loss_types:
        s = replace(s, loss_types=tuple(args.loss_types.split(",")))
    if args.kto_lr:
        s = replace(s, kto_lr=args.kto_lr)
    pair_opts = {k: getattr(args, k) for k in ("samples", "temperature", "pairs_per_question")
                 if getattr(args, k) is not None}
    s = replace(s, pairs=replace(s.pairs, **pair_opts))
    if lr is not None:
        s = replace(s, lr=lr)
    if args.smoke:  # seconds-sized, to check the script itself
        s = replace(s, n_train=200, n_heldout=30, n_pair_questions=30, sft=replace(s.sft, batch_size=16,
                    warmup_steps=2), pairs=replace(s.pairs, samples=2), batch_size=1)
    return s


def child(args):
    """One job, in its own process: stage 'prep' (task, SFT, pairs) or 'pipe' (the pipeline at one lr)."""
    import torch
    torch.set_num_threads(args.threads)
    from prefpipe.pipeline import demo
    from prefpipe.pipeline.config import resolve
    from prefpipe.pipeline.run import run_pipeline

    log = lambda m: print(m, flush=True)  # noqa: E731
    prep = Path(args.out) / f"prep-s{args.seed}-n{args.steps}"
    if args.stage == "prep":
        s = settings(args, args.seed, args.steps, out=str(prep))
        t0 = time.perf_counter()
        train, _ = demo.make_task(s, prep, log)
        t1 = time.perf_counter()
        sft = demo.make_sft(s, prep, train, log)
        t2 = time.perf_counter()
        demo.make_pairs(s, prep, sft, train, log)
        t3 = time.perf_counter()
        (prep / "prep_timing.json").write_text(json.dumps({"sft": t2 - t1, "pairs": t3 - t2}))
        return
    job = Path(args.out) / f"job-s{args.seed}-n{args.steps}-lr{args.lr:g}-e{args.epochs or 1}"
    job.mkdir(parents=True, exist_ok=True)
    for name in ("sft", "data", "task"):
        if not (job / name).exists():
            os.symlink((prep / name).resolve(), job / name)
    s = settings(args, args.seed, args.steps, lr=args.lr, out=str(job))
    cfg = demo.write_config(s, job)
    t0 = time.perf_counter()
    summary = run_pipeline(resolve(str(cfg), {"progress": False}), log=log)
    acc = {n: e["gen"]["accuracy"] for n, e in summary["evals"].items() if "gen" in e}
    (job / "job.json").write_text(json.dumps({"seed": args.seed, "steps": args.steps, "lr": args.lr,
                                              "epochs": args.epochs or 1,
                                              "accuracy": acc, "wall_s": time.perf_counter() - t0,
                                              "timing_s": summary["timing_s"]}))


# Options every child gets; the prep key includes the pair options, so one --out can hold several pair settings.
PASS_ON = ("target_accuracy", "betas", "epochs", "n_pair_questions", "batch_size", "loss_types", "kto_lr", "samples", "temperature",
           "pairs_per_question")


def spawn(args, stage, seed, steps, lr=None) -> int:
    cmd = [sys.executable, __file__, "--child", stage, "--out", args.out, "--seed", str(seed), "--steps", str(steps),
           "--threads", str(args.threads), "--device", args.device]
    for k in PASS_ON:
        v = getattr(args, k)
        if v:
            cmd += [f"--{k}", str(v)]
    if args.smoke:
        cmd.append("--smoke")
    if lr is not None:
        cmd += ["--lr", str(lr)]
    name = f"{stage}-s{seed}-n{steps}" + (f"-lr{lr:g}-e{args.epochs or 1}" if lr is not None else "")
    with open(Path(args.out) / f"{name}.log", "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    print(f"{name}: exit {rc}", flush=True)
    return rc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sft_steps", default="400")
    ap.add_argument("--lrs", default="1e-4")
    ap.add_argument("--betas", default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--n_pair_questions", type=int, default=None)
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--loss_types", default=None, help="e.g. dpo,sft (default: the demo's)")
    ap.add_argument("--kto_lr", type=float, default=None)
    ap.add_argument("--target_accuracy", type=float, default=None, help="SFT stopping rule (0: none)")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--pairs_per_question", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--prep_only", action="store_true")
    ap.add_argument("--report_only", action="store_true", help="Only summarise the finished jobs in --out.")
    ap.add_argument("--child", default=None)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float)
    args = ap.parse_args()
    if args.child:
        args.stage = args.child
        return child(args)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",")]
    steps = [int(x) for x in args.sft_steps.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    t0 = time.perf_counter()
    if not args.report_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda a: spawn(args, "prep", *a), [(s, n) for s in seeds for n in steps]))
            print(f"prep done in {time.perf_counter() - t0:.0f}s", flush=True)
            if args.prep_only:
                return
            # Seeds innermost, so that whole groups finish first if the sweep is cut short.
            list(pool.map(lambda a: spawn(args, "pipe", *a), [(s, n, lr) for n in steps for lr in lrs
                                                               for s in seeds]))
    results = []
    for f in sorted(Path(args.out).glob("job-*/job.json")):
        results.append(json.loads(f.read_text()))
    for f in sorted(Path(args.out).glob("prep-*/data/pairs_stats.json")):
        st = json.loads(f.read_text())
        timing = json.loads((f.parent.parent / "prep_timing.json").read_text()) \
            if (f.parent.parent / "prep_timing.json").exists() else {}
        print(f"{f.parent.parent.name}: pairs {st['pairs']}, sample acc {st['sample_accuracy']:.3f}, "
              f"timing {timing}")
    Path(args.out, "sweep.json").write_text(json.dumps(results, indent=1))
    print(f"all done in {time.perf_counter() - t0:.0f}s")
    for n in steps:
        for lr in lrs:
            group = [r for r in results if r["steps"] == n and r["lr"] == lr and r.get("epochs", 1) == (args.epochs or 1)]
            if not group:
                continue
            names = list(group[0]["accuracy"])
            print(f"\nSFT steps {n}, lr {lr:g}, seeds {[r['seed'] for r in group]}")
            base = [r["accuracy"]["reference"] for r in group]
            for name in names:
                vals = [r["accuracy"].get(name) for r in group]
                gains = [100 * (v - b) for v, b in zip(vals, base)]
                sd = statistics.stdev(gains) if len(gains) > 1 else 0.0
                print(f"  {name:16} acc {100 * statistics.mean(vals):5.1f}%  gain {statistics.mean(gains):+5.1f} "
                      f"± {sd:.1f} pts  per seed {' '.join(f'{g:+.1f}' for g in gains)}")


if __name__ == "__main__":
    main()
