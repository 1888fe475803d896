"""The demo numbers in bench/RESULTS.md: `prefpipe demo --seed S` for several seeds, then mean ± sd of the gains.

    python bench/demo_seeds.py --seeds 0,1,2,3,4 --out /tmp/demo-seeds        # runs them one after another
    python bench/demo_seeds.py --results DIR1/demo_result.json DIR2/...      # only aggregates finished runs

Gains are in points of held-out exact-match accuracy over the SFT model of the same seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path


def aggregate(paths: list[Path]) -> str:
    results = [json.loads(p.read_text()) for p in paths]
    names = [n for n in results[0]["accuracy"] if n != "reference"]
    lines = [f"seeds: {[r['seed'] for r in results]}; machine: {platform.machine()}, {platform.processor() or '?'}",
             f"{'run':14} {'accuracy':>16} {'gain (points)':>16}   per seed"]
    base = [100 * r["accuracy"]["reference"] for r in results]
    lines.append(f"{'SFT model':14} {statistics.mean(base):8.1f} ± {statistics.stdev(base) if len(base) > 1 else 0:4.1f}"
                 f" {'':>16}   " + " ".join(f"{b:.1f}" for b in base))
    for name in names:
        acc = [100 * r["accuracy"][name] for r in results]
        gain = [a - b for a, b in zip(acc, base)]
        sd = statistics.stdev(gain) if len(gain) > 1 else 0.0
        lines.append(f"{name:14} {statistics.mean(acc):8.1f} ± {statistics.stdev(acc) if len(acc) > 1 else 0:4.1f}"
                     f" {statistics.mean(gain):+9.1f} ± {sd:4.1f}   " + " ".join(f"{g:+.1f}" for g in gain))
    times = [r["timing_s"]["total"] for r in results]
    lines.append(f"wall time per demo: {', '.join(f'{t:.0f}s' for t in times)}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="/tmp/demo-seeds")
    ap.add_argument("--results", nargs="*", default=None)
    args = ap.parse_args()
    if args.results:
        print(aggregate([Path(p) for p in args.results]))
        return
    paths = []
    for s in (int(x) for x in args.seeds.split(",")):
        out = Path(args.out) / f"seed-{s}"
        subprocess.run([sys.executable, "-m", "prefpipe", "demo", "--seed", str(s), "--out", str(out)], check=True)
        paths.append(out / "demo_result.json")
    print(aggregate(paths))


if __name__ == "__main__":
    main()
