"""A million rows: precompute, inspect and train on a synthetic dataset of short pairs, measuring each command's
peak RSS and wall time at two sizes (outside CI; CPU is enough).

    PYTHONPATH=. python bench/scale.py --rows 100000 --rows 1000000 --work /tmp/scale --threads 1

Each command runs as its own subprocess (`python -m prefpipe ...`); its peak RSS is the child's `ru_maxrss` from
`os.wait4`. Data: JSONL written on the fly with numpy (prompts 3-8 words, responses 2-6 words, from the words the
tiny tokenizer was trained on), model: `prefpipe.tiny` with hidden 64 and 2 layers. Precompute is resumable: a
rerun with the same --work reuses the data file and keeps finished parts (so its time and RSS are then those of a
resume; give a fresh --work to measure a whole run). Each size's numbers are also written to `result.json` in its
directory. Target: at the larger size, each command's peak RSS is at most 1.2x its value at the smaller size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("the quick brown fox jumps over lazy dog question what is plus answer how are you fine thank "
         "preference optimisation trains policy against frozen reference text too minus times equals").split()


def write_pairs(path: Path, n: int, seed: int = 0, chunk: int = 100_000):
    import numpy as np
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w") as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            lines = []
            for field_words in (rng.integers(3, 9, m), rng.integers(2, 7, m), rng.integers(2, 7, m)):
                idx = rng.integers(0, len(words), (m, 8))
                lines.append([" ".join(words[idx[i, :k]]) for i, k in enumerate(field_words)])
            for i, (p, c, r) in enumerate(zip(*lines)):
                f.write(json.dumps({"id": f"r{start + i}", "prompt": p, "chosen": c, "rejected": r + " no"}) + "\n")


def run(cmd: list[str], log: Path, threads: int | None = None) -> dict:
    """Run `cmd`, return wall seconds and the child's peak RSS in MiB. `threads` caps torch's intra-op threads
    through OMP_NUM_THREADS (read when torch starts), the only knob the commands have for it."""
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def one_size(n: int, work: Path, model: Path, args) -> dict:
    d = work / (f"n{n}" + ("-noref" if args.no_reference else ""))
    d.mkdir(parents=True, exist_ok=True)
    data = d / "pairs.jsonl"
    if not data.exists():
        t0 = time.perf_counter()
        write_pairs(data, n)
        print(f"  data: {n} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    py = [sys.executable, "-m", "prefpipe"]
    res = {"rows": n, "no_reference": args.no_reference}
    res["precompute"] = run(py + ["precompute", "--model", str(model), "--data", str(data), "--out",
                                  str(d / "cache"), "--max_length", str(args.max_length), "--part_rows",
                                  str(args.part_rows), "--no_progress", "--dtype", "float32", "--device", "cpu"]
                            + (["--no_reference"] if args.no_reference else []), d / "precompute.log", args.threads)
    print(f"  precompute: {res['precompute']}", flush=True)
    res["inspect"] = run(py + ["inspect", str(d / "cache")], d / "inspect.log", args.threads)
    print(f"  inspect: {res['inspect']}", flush=True)
    res["train"] = run(py + ["train", "--model", str(model), "--cache", str(d / "cache"), "--out", str(d / "runs"),
                             "--loss_type", "orpo" if args.no_reference else "dpo", "--max_steps", str(args.steps),
                             "--batch_size", "8", "--eval_fraction", str(args.eval_fraction), "--save_every", "0",
                             "--drift_rows", "8", "--no_progress", "--device", "cpu", "--dtype", "float32"],
                       d / "train.log", args.threads)
    print(f"  train: {res['train']}", flush=True)
    (d / "result.json").write_text(json.dumps(res) + "\n")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, action="append", help="dataset sizes, smallest first")
    ap.add_argument("--work", default="/tmp/prefpipe-scale")
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--part_rows", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eval_fraction", type=float, default=0.0005)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per command (OMP_NUM_THREADS) [default: torch's, one per core]")
    ap.add_argument("--no_reference", action="store_true",
                    help="tokenize-only precompute and ORPO training: the memory behaviour without the scoring "
                    "time (the tiny model scores ~1-5k rows/s on 2 busy cores)")
    args = ap.parse_args()
    sizes = args.rows or [100_000, 1_000_000]
    work = Path(args.work)
    model = work / "tiny"
    if not (model / "config.json").exists():
        from prefpipe.tiny import build_tiny
        build_tiny(model, hidden_size=64, num_layers=2)
    print(f"load: {os.getloadavg()}", flush=True)
    results = []
    for n in sizes:
        print(f"rows {n}:", flush=True)
        results.append(one_size(n, work, model, args))
    base = results[0]
    for r in results[1:]:
        for cmd in ("precompute", "inspect", "train"):
            ratio = r[cmd]["peak_rss_mib"] / base[cmd]["peak_rss_mib"]
            print(f"{cmd:10} peak RSS {base['rows']}: {base[cmd]['peak_rss_mib']} MiB, {r['rows']}: "
                  f"{r[cmd]['peak_rss_mib']} MiB ({ratio:.2f}x)")
    print(f"load: {os.getloadavg()}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
