"""Every registered loss (and MPO's weighted combination) on the demo task: held-out accuracy gain over the SFT model.

    python bench/loss_zoo.py --seeds 0,1,2 --out bench-out/zoo --threads 1 [--deadline 06:12] [--losses a,b,...]
    python bench/loss_zoo.py --seeds 0,1,2 --out bench-out/zoo --aggregate      # only tabulate finished runs

Seeds can run side by side as separate processes (different --seeds; they share nothing but OUT). A rerun skips
every loss whose OUT/seed-S/zoo-runs/zoo-<loss>.json exists.

For each seed S, in OUT/seed-S:
1. the demo's task, SFT model and on-policy pairs, made by the demo's own functions with `prefpipe demo --seed S`'s
   settings (`make_task`, `make_sft`, `make_pairs`, `write_config` from prefpipe/demo/run.py; each is cached by what
   made it, so a directory `prefpipe demo --out OUT/seed-S --seed S` already filled is reused as is). The demo's own
   six-run pipeline is not run: every loss it trains is in the sweep below.
2. per loss L, one `prefpipe pipeline --config OUT/seed-S/zoo-L.toml --loss_type L --beta 1 (--kto_beta 1 for
   the KTO-data losses) --runs_dir OUT/seed-S/zoo-runs` (--eval_baseline on the first; a rerun keeps the finished
   runs): the demo's config less the keys L does not read, which the pipeline refuses (lr 3e-4; the KTO-data
   losses kto and apo_zero_unpaired at the demo's kto_lr 1e-4 with desirable_weight = n_U/n_D, from the KTO cache),
   beta 1 for every loss that takes one. All calls share one runs dir, so one paired cache (and one KTO cache) serves
   every loss, as in a single sweep; one call per loss evaluates each run as soon as it is trained, so a sweep cut by
   --deadline keeps every finished loss.

Gain: points of held-out greedy exact match (500 questions) over the same seed's SFT model. Wall: the run's training
wall time plus its held-out evaluation, in seconds, mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

MPO = "0.8*sigmoid+0.2*bco_pair+1*sft"


def all_losses() -> list[str]:
    from prefpipe.train.registry import LOSS_TYPES
    return list(LOSS_TYPES) + [MPO]


def prepare(seed: int, out: Path, threads: int | None = None):
    """The demo's steps 1-3 and its run.toml, exactly as `prefpipe demo --out OUT --seed SEED` makes them."""
    import torch

    from prefpipe.demo.run import DemoSettings, make_pairs, make_sft, make_task, write_config
    from prefpipe.tokenizer import quiet_transformers

    quiet_transformers()
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    s = DemoSettings(out=str(out), seed=seed)
    s = replace(s, sft=replace(s.sft, seed=s.seed), pairs=replace(s.pairs, seed=s.seed))  # as run_demo does
    out.mkdir(parents=True, exist_ok=True)

    def log(m):
        print(f"[seed {seed}] {m}", flush=True)
    train, _ = make_task(s, out, log)
    sft_dir = make_sft(s, out, train, log)
    make_pairs(s, out, sft_dir, train, log)
    return write_config(s, out)


def config_for(config: Path, lt: str) -> tuple[Path, list[str]]:
    """The demo's config for `lt` alone, and its beta options: less the keys `lt` does not read (the KTO-data keys
    for a paired loss, `beta` for a KTO-data one, both betas for a loss without beta), which the pipeline refuses."""
    from prefpipe.train.registry import LOSSES

    spec = LOSSES[lt]
    drop = {"kto_data", "kto_beta", "kto_lr"} if spec.paired else {"beta"}
    drop |= set() if spec.uses_beta else {"beta", "kto_beta"}
    keep = [line for line in config.read_text().splitlines(keepends=True) if line.split("=")[0].strip() not in drop]
    dest = config.with_name(f"zoo-{lt.replace('*', '')}.toml")
    dest.write_text("".join(keep))
    flags = [] if not spec.uses_beta else ["--beta", "{beta}"] if spec.paired else ["--kto_beta", "{beta}"]
    return dest, flags


def run_seed(seed: int, out: Path, losses: list[str], beta: float, threads: int | None, deadline: float | None):
    """One `prefpipe pipeline` call per loss into the same RUNS_DIR (the caches are made by the first and reused by
    the others; a rerun keeps runs already finished), each call's pipeline.json kept as zoo-runs/zoo-<loss>.json, so
    every finished loss is evaluated as soon as it is trained and a stopped sweep loses at most one run."""
    import os

    t0 = time.perf_counter()
    config = prepare(seed, out, threads)
    runs_dir = out / "zoo-runs"
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    for lt in losses:
        dest = runs_dir / f"zoo-{lt}.json"
        if dest.exists():
            continue
        if deadline is not None and time.time() > deadline:
            print(f"[seed {seed}] deadline passed: {lt} and the losses after it not run", flush=True)
            return
        lt_config, flags = config_for(config, lt)
        cmd = [sys.executable, "-m", "prefpipe", "pipeline", "--config", str(lt_config.resolve()),
               "--runs_dir", str(runs_dir.resolve()), *[f.format(beta=beta) for f in flags], "--no_progress",
               "--loss_type", lt]
        if not (runs_dir / "zoo-reference.json").exists():
            cmd.append("--eval_baseline")
        print(f"[seed {seed}] {' '.join(cmd)}", flush=True)
        t1 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        p = json.loads((runs_dir / "pipeline.json").read_text())
        if "reference" in p["evals"]:
            (runs_dir / "zoo-reference.json").write_text(json.dumps(p["evals"]["reference"], indent=2))
        p["zoo"] = {"command": cmd, "threads": threads, "call_s": round(time.perf_counter() - t1, 1),
                    "since_seed_start_s": round(time.perf_counter() - t0, 1)}
        dest.write_text(json.dumps(p, indent=2))


def collect(out: Path, seed: int) -> dict:
    """{run name: accuracy, train wall s, eval wall s} and the SFT model's accuracy, from each loss's pipeline.json."""
    runs_dir = out / "zoo-runs"
    runs = {}
    for f in sorted(runs_dir.glob("zoo-*.json"), key=lambda f: f.stat().st_mtime):
        if f.name == "zoo-reference.json":
            continue
        p = json.loads(f.read_text())
        for r in p["runs"]:
            name = Path(r["dir"]).name
            e = p["evals"][name]["gen"]
            runs[name] = {"loss": r.get("loss_type", name), "accuracy": e["accuracy"], "train_s": r["wall_s"],
                          "eval_s": e["wall_s"], "command": p["zoo"]["command"]}
    ref = json.loads((runs_dir / "zoo-reference.json").read_text())["gen"]
    return {"seed": seed, "reference": ref["accuracy"], "reference_eval_s": ref["wall_s"], "runs": runs}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(results: list[dict], caption: str) -> tuple[str, list[dict]]:
    """Markdown: one row per run, best mean gain first; sd only over 2 or more seeds."""
    names = list(dict.fromkeys(n for r in results for n in r["runs"]))
    rows = []
    for name in names:
        have = [r for r in results if name in r["runs"]]
        gains = [100 * (r["runs"][name]["accuracy"] - r["reference"]) for r in have]
        walls = [r["runs"][name]["train_s"] + r["runs"][name]["eval_s"] for r in have]
        rows.append({"run": name, "seeds": [r["seed"] for r in have], "gain_mean": statistics.mean(gains),
                     "gain_sd": statistics.stdev(gains) if len(gains) > 1 else None, "gains": gains,
                     "accuracy": [r["runs"][name]["accuracy"] for r in have], "wall_s_mean": statistics.mean(walls),
                     "train_s": [r["runs"][name]["train_s"] for r in have],
                     "eval_s": [r["runs"][name]["eval_s"] for r in have]})
    rows.sort(key=lambda x: -x["gain_mean"])
    lines = [caption, "",
             "| run | gain (points), mean ± sd | per seed | wall s per run (train + eval), mean |",
             "|---|---|---|---|",
             f"| SFT model (accuracy %) | {statistics.mean(100 * r['reference'] for r in results):.1f} | "
             + " ".join(f"s{r['seed']} {100 * r['reference']:.1f}" for r in results) + " | |"]
    for x in rows:
        sd = f" ± {x['gain_sd']:.1f}" if x["gain_sd"] is not None else " (1 seed)"
        lines.append(f"| {x['run']} | {x['gain_mean']:+.1f}{sd} | "
                     f"{' '.join(f's{s} {g:+.1f}' for s, g in zip(x['seeds'], x['gains']))} | {x['wall_s_mean']:.1f} |")
    return "\n".join(lines), rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="bench-out/zoo")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--losses", default=None, help="comma-separated subset [default: every loss, and MPO]")
    ap.add_argument("--json", default=None, help="[default: OUT/loss_zoo.json]")
    ap.add_argument("--aggregate", action="store_true", help="only tabulate the seeds already run")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the pipeline calls")
    ap.add_argument("--deadline", default=None, help="UTC HH:MM: start no pipeline call after it")
    args = ap.parse_args()
    out = Path(args.out)
    seeds = [int(x) for x in args.seeds.split(",")]
    losses = args.losses.split(",") if args.losses else all_losses()
    deadline = None
    if args.deadline:
        import datetime as dt
        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    if not args.aggregate:
        for s in seeds:
            run_seed(s, out / f"seed-{s}", losses, args.beta, args.threads, deadline)
    results = [collect(out / f"seed-{s}", s) for s in seeds
               if (out / f"seed-{s}" / "zoo-runs" / "zoo-reference.json").exists()]
    caption = (f"seeds {[r['seed'] for r in results]}; beta {args.beta:g}; {cpu_name()}, {os.cpu_count()} cores; "
               f"pipeline threads {args.threads or 'default'}; gain = points of held-out exact match (500 questions) "
               "over the seed's SFT model")
    text, rows = table(results, caption)
    print(text)
    dest = Path(args.json) if args.json else out / "loss_zoo.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({"caption": caption, "rows": rows, "seeds": results}, indent=2))
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
