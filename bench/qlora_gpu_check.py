"""GPU check for QLoRA (`--load_in_4bit`): needs CUDA and bitsandbytes; not run on the CPU-only dev machine.

Steps, each through the real CLI (`python -m prefpipe`), on a random-init Llama (hidden 2048, 16 layers, vocab
32000 by default: about 1B parameters) and a few hundred synthetic pairs:

1. `precompute --load_in_4bit --dtype bfloat16`: the reference scored by the 4-bit model; the cache's backend
   provenance must say `"quantization": "nf4"`.
2. `train --lora_r 16 --load_in_4bit` against that cache (cached reference): the step-0 drift must be small
   (the same 4-bit weights; float32 norms/embeddings in the policy against bf16 in precompute, so a few hundredths
   of a nat per token at most) and the loss must move.
3. The same with `--reference live` (the adapter disabled is the reference): step-1 loss must be log 2.
4. `train --lora_r 16` without 4-bit, to compare peak GPU memory (4-bit should be well below).
5. `eval` of the 4-bit run's `final/` (loaded in bf16, merged) on the cache.

Prints one table and exits non-zero if a check fails. Output (logs, summaries) under $OUT (default .devout/).

    python bench/qlora_gpu_check.py                         # about 3-5 minutes on one H100/H200
    python bench/qlora_gpu_check.py --hidden 256 --layers 2 --vocab 4000 --rows 64   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_step import build_model, make_data  # noqa: E402


def cli(out: Path, name: str, *args) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prefpipe", *map(str, args)], capture_output=True, text=True)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--prompt_words", type=int, default=32)
    ap.add_argument("--response_words", type=int, default=96)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("qlora_gpu_check needs a CUDA GPU")
    out = Path(os.environ.get("OUT", ".devout"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    failures, rows = [], []
    with tempfile.TemporaryDirectory(prefix="prefpipe-qlora-") as tmp:
        tmp = Path(tmp)
        n_params = build_model(tmp / "model", args)
        make_data(tmp / "pairs.jsonl", args.rows, args)
        model, cache = tmp / "model", tmp / "cache"
        wall = cli(out, "precompute", "precompute", "--model", model, "--data", tmp / "pairs.jsonl", "--out", cache,
                   "--dtype", "bfloat16", "--load_in_4bit", "--no_progress")
        backend = json.loads((cache / "manifest.json").read_text())["metadata"].get("backend") or {}
        if backend.get("quantization") != "nf4":
            failures.append("the cache does not record nf4 quantization")
        rows.append(("precompute 4-bit", wall, None, None))
        common = ["train", "--model", model, "--cache", cache, "--lora_r", 16, "--lr", "2e-4", "--max_steps",
                  args.steps, "--batch_size", args.batch_size, "--no_progress"]
        for name, extra in (("qlora-cached", ["--load_in_4bit"]), ("qlora-live", ["--load_in_4bit", "--reference",
                            "live"]), ("lora-bf16-cached", [])):
            wall = cli(out, name, *common, *extra, "--out", tmp / name)
            summary = json.loads((tmp / name / "summary.json").read_text())
            (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=2))
            run = summary["runs"][0]
            steps = [json.loads(x) for x in (tmp / name / run["metrics"]).read_text().splitlines()]
            drift = (summary["validation"].get("drift") or {}).get("mean_abs_per_token")
            rows.append((name, wall, run["peak_memory_gb"], drift))
            if name == "qlora-cached" and (drift is None or drift > 0.05):
                failures.append(f"{name}: step-0 drift {drift}")
            if name == "qlora-live" and abs(steps[0]["loss"] - math.log(2)) > 1e-3:
                failures.append(f"{name}: step-1 loss {steps[0]['loss']} is not log 2")
            if abs(steps[-1]["loss"] - steps[0]["loss"]) < 1e-3:
                failures.append(f"{name}: the loss did not move")
        q, full = rows[1][2], rows[3][2]
        if q is not None and full is not None and not q < full:
            failures.append(f"4-bit peak memory {q:.2f} GiB is not below the bf16 LoRA's {full:.2f} GiB")
        wall = cli(out, "eval", "eval", "--model", tmp / "qlora-cached" / "dpo-beta0.1", "--cache", cache,
                   "--dtype", "bfloat16")
        rows.append(("eval final/", wall, None, None))
    print(f"{torch.cuda.get_device_name(0)}; model {n_params / 1e9:.2f}B params; {args.steps} steps x "
          f"{args.batch_size} pairs")
    print(f"{'step':<18} {'wall s':>8} {'CUDA peak GiB':>14} {'step-0 drift':>13}")
    for name, wall, peak, drift in rows:
        print(f"{name:<18} {wall:>8.1f} {f'{peak:.2f}' if peak is not None else '-':>14} "
              f"{f'{drift:.3g}' if drift is not None else '-':>13}")
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("all QLoRA checks passed")


if __name__ == "__main__":
    main()
