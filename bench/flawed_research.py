"""Research runs for `prefpipe demo --task flawed`: the five arms for given seeds and settings.

    python bench/flawed_research.py --seeds 0,1,2 --out /tmp/flawed            # the demo's settings
    python bench/flawed_research.py --seeds 0 --set rounds_reference=initial --set lr=1e-3 --tag ref-initial
    python bench/flawed_research.py --aggregate /tmp/flawed/log.jsonl          # mean over seeds per tag

Each run is prefpipe.demo.flawed_run.run_flawed (prefpipe's own precompute, train and eval --gen; sampling and
pairing in prefpipe/demo/flawed_rounds.py) into OUT/<tag>/seed-S. The SFT model of a seed is reused across tags
when its settings match (it is copied from the first tag's directory), so a sweep over arm settings pays for SFT
once per seed. Every round's policy is evaluated on the held-out questions too (research only). One JSON line per
run goes to OUT/log.jsonl: settings, accuracies, per-round accuracies, wall time and `uptime` before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefpipe.demo.flawed_run import ARMS, FlawedSettings, evaluate, run_flawed, sft_key  # noqa: E402


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def parse_sets(pairs: list[str]) -> dict:
    """`name=value` overrides of FlawedSettings; `sampling.x=` and `sft.x=` reach the nested settings."""
    top, nested = {}, {"sampling": {}, "sft": {}}
    for p in pairs:
        name, value = p.split("=", 1)
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        if "." in name:
            group, key = name.split(".", 1)
            nested[group][key] = v
        else:
            top[name] = v
    if nested["sampling"]:
        top["sampling"] = dataclasses.replace(FlawedSettings().sampling, **nested["sampling"])
    if nested["sft"]:
        top["sft"] = dataclasses.replace(FlawedSettings().sft, **nested["sft"])
    return top


def reuse_sft(out: Path, s: FlawedSettings, dest: Path):
    """Copy a finished SFT model made with these settings from another tag's directory."""
    if (dest / "sft" / "sft_summary.json").exists():
        return
    for d in sorted(out.glob(f"*/seed-{s.seed}/sft/sft_summary.json")):
        if json.loads(d.read_text()).get("key") == sft_key(s):
            shutil.copytree(d.parent, dest / "sft")
            return


def round_accuracies(s: FlawedSettings, run_out: Path) -> list[float]:
    heldout = run_out / "task" / "heldout.jsonl"
    accs = []
    for i in range(1, s.rounds + 1):
        finals = sorted((run_out / "rounds" / f"round-{i}" / "runs").glob("*/final"))
        if finals:
            accs.append(evaluate(s, finals[0], heldout, run_out / "rounds" / f"round-{i}", f"round-{i}"))
    return accs


def run_one(out: Path, tag: str, seed: int, overrides: dict) -> dict:
    dest = out / tag / f"seed-{seed}"
    dest.mkdir(parents=True, exist_ok=True)
    s = FlawedSettings(out=str(dest), seed=seed, **overrides)
    reuse_sft(out, s, dest)
    before, t0 = load(), time.perf_counter()
    results = run_flawed(s, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    details = json.loads((dest / "details.json").read_text())
    rec = {"tag": tag, "seed": seed, "overrides": {k: str(v) for k, v in overrides.items()},
           "accuracy": {a: results[a]["accuracy"] for a in ARMS}, "round_accuracy": round_accuracies(s, dest),
           "sft_steps": details["sft"]["steps"], "sampling": details["sampling"],
           "rounds": [{k: r[k] for k in ("round", "steps", "sampling")} for r in details["arms"]["rounds"]["rounds"]],
           "tokens": {a: details["arms"].get(a, {}).get("tokens", 0) for a in ARMS},
           "timing_s": details["timing_s"], "wall_s": round(wall, 1), "uptime_before": before, "uptime_after": load()}
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def aggregate(log: Path) -> str:
    recs = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    tags = list(dict.fromkeys(r["tag"] for r in recs))
    lines = []
    for tag in tags:
        rs = [r for r in recs if r["tag"] == tag]
        lines.append(f"## {tag}  seeds {[r['seed'] for r in rs]}  overrides {rs[0]['overrides']}")
        lines.append("| arm | " + " | ".join(f"seed {r['seed']}" for r in rs) + " | mean |")
        lines.append("|---" * (len(rs) + 2) + "|")
        for arm in ARMS:
            accs = [100 * r["accuracy"][arm] for r in rs]
            lines.append(f"| {arm} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {statistics.mean(accs):.1f} |")
        gap = [100 * (r["accuracy"]["rounds"] - r["accuracy"]["more_sft"]) for r in rs]
        lines.append(f"rounds - more_sft: {', '.join(f'{g:+.1f}' for g in gap)} (mean {statistics.mean(gap):+.1f})")
        lines.append("per-round accuracy: " + "; ".join(
            " ".join(f"{100 * a:.1f}" for a in r["round_accuracy"]) for r in rs))
        lines.append("wall: " + ", ".join(f"{r['wall_s']:.0f}s (sft {r['timing_s']['sft']:.0f}s)" for r in rs))
        lines.append("load: " + " | ".join(r["uptime_before"].split("load average:")[-1].strip() for r in rs))
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default="/tmp/flawed-research")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--set", action="append", default=[], help="FlawedSettings override, name=value (JSON)")
    ap.add_argument("--aggregate", default=None)
    args = ap.parse_args()
    if args.aggregate:
        print(aggregate(Path(args.aggregate)))
        return
    overrides = parse_sets(args.set)
    out = Path(args.out)
    for seed in (int(x) for x in args.seeds.split(",")):
        rec = run_one(out, args.tag, seed, overrides)
        print(json.dumps({k: rec[k] for k in ("tag", "seed", "accuracy", "round_accuracy", "wall_s")}), flush=True)
    print(aggregate(out / "log.jsonl"))


if __name__ == "__main__":
    main()
