"""Benchmark: `prefpipe precompute` in one process against `--engine ray` with 1 and 2 actors (a local Ray
instance the command starts and stops), same model, same data, one invocation.

Each configuration runs the real CLI in a fresh subprocess on two input sizes that differ only in their number
of parts, so that its wall time splits into a fixed start-up cost (the intercept: Python and torch imports, model
load; for Ray also the instance start, the actors' own imports and model loads, and the shutdown) and a cost per
part (the slope: tokenizing, scoring, writing; for Ray also shipping the ids and waiting on the actors). From
those, the number of parts at which Ray's pool beats the single process on this machine, if it ever does. The
machine's load (`uptime`) is printed before and after: the numbers mean little without it. Usage:

    python bench/ray_precompute.py            # CPU, the numbers in bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_pairs(path: Path, n: int, seed: int, max_words: int):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(300)]

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"Q{i}: " + text(rng.randint(5, max_words)),
                   "chosen": text(rng.randint(5, max_words)), "rejected": text(rng.randint(5, max_words)) + " no"}
            f.write(json.dumps(row) + "\n")


def run(model: Path, data: Path, out: Path, part_rows: int, extra: list[str], env: dict) -> float:
    """The command's own wall time (its summary line), which excludes only the interpreter start."""
    cmd = [sys.executable, "-m", "prefpipe", "precompute", "--model", str(model), "--data", str(data), "--out",
           str(out), "--part_rows", str(part_rows), "--no_progress", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return float(re.search(r"in ([\d.]+) s wall", res.stdout).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part_rows", type=int, default=32)
    ap.add_argument("--parts", type=int, nargs=2, default=[2, 10], help="the two input sizes, in parts")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max_words", type=int, default=120)
    ap.add_argument("--reps", type=int, default=3, help="runs of each configuration and size; the median is used")
    a = ap.parse_args()

    from prefpipe.tiny import build_tiny
    # Ray gives each 1-CPU actor OMP_NUM_THREADS=1; "local 1t" is the single process under the same limit, so
    # that ray x1 against it is the engine's own overhead, and "local" (torch's default threads) is what users run.
    configs = {"local": ([], {}), "local 1t": ([], {"OMP_NUM_THREADS": "1"}),
               "ray x1": (["--engine", "ray", "--ray_workers", "1"], {}),
               "ray x2": (["--engine", "ray", "--ray_workers", "2"], {})}
    os.environ.pop("OMP_NUM_THREADS", None)
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1/5/15 min), {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny(tmp / "model", hidden_size=a.hidden, num_layers=a.layers)
        data = {}
        for n in a.parts:
            data[n] = tmp / f"pairs-{n}.jsonl"
            write_pairs(data[n], n * a.part_rows, seed=0, max_words=a.max_words)
        runs = {c: {n: [] for n in a.parts} for c in configs}
        t0 = time.time()
        for rep in range(a.reps):  # reps, then sizes, outside; configurations inside: drift hits every one
            for n in a.parts:
                for c, (extra, env) in configs.items():
                    out = tmp / f"out-{c.replace(' ', '')}-{n}-{rep}"
                    runs[c][n].append(run(model, data[n], out, a.part_rows, extra, env))
        total = time.time() - t0
        walls = {c: {n: statistics.median(runs[c][n]) for n in a.parts} for c in configs}
    small, large = a.parts
    print(f"tiny Llama hidden {a.hidden}, {a.layers} layers; {a.part_rows} pairs a part; {small} and {large} parts; "
          f"median of {a.reps}")
    print(f"{'config':8} {'wall ' + str(small):>9} {'wall ' + str(large):>9} {'fixed s':>8} {'s/part':>7}")
    fit = {}
    for c in configs:
        slope = (walls[c][large] - walls[c][small]) / (large - small)
        fixed = walls[c][small] - slope * small
        fit[c] = (fixed, slope)
        print(f"{c:8} {walls[c][small]:9.1f} {walls[c][large]:9.1f} {fixed:8.1f} {slope:7.3f}   runs: "
              + "; ".join(f"{n} parts " + ", ".join(f"{w:.1f}" for w in runs[c][n]) for n in a.parts))
    for c, base in (("ray x1", "local 1t"), ("ray x1", "local"), ("ray x2", "local")):
        (f0, s0), (f1, s1) = fit[base], fit[c]
        over = f"{c}: {f1 - f0:+.1f} s fixed, {s1 - s0:+.3f} s a part against {base}; "
        print(over + (f"pays off beyond {(f1 - f0) / (s0 - s1):.0f} parts" if s1 < s0 else "never pays off here"))
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"{total:.0f} s in all")


if __name__ == "__main__":
    main()
