"""prefpipe against TRL's `DPOTrainer(precompute_ref_log_probs=True)`: reference precompute tokens/s and training
step time, same data, same tiny model, tokens counted the same way for both (outside CI; not run in the tests).

TRL lives in its own virtual environment so it cannot change prefpipe's:

    python -m venv .venv-trl && .venv-trl/bin/pip install trl==1.16.0 torch==2.13.0 numpy
    PYTHONPATH=. python bench/compare_trl.py --tool prefpipe --work /tmp/cmp                # prefpipe (first)
    PYTHONPATH=. .venv-trl/bin/python bench/compare_trl.py --tool trl --work /tmp/cmp      # TRL
    PYTHONPATH=. python bench/compare_trl.py --report /tmp/cmp                              # side by side

Both read `pairs.jsonl` (written by the prefpipe run, which also counts the tokens) and the tiny model from `prefpipe.tiny`, both score
in float32 on the CPU with `--threads` torch threads. Tokens: prompt + response per scored response, from the
model's tokenizer (`prefpipe.data.tokenize` rules), identical for both sides. TRL's time is split by running
`train()` twice, with `--steps` and `2 x --steps` optimizer steps: the difference is `--steps` steps, the rest of
the first run is its reference precompute plus set-up (so TRL's precompute rate is a lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def ensure_inputs(work: Path, pairs: int):
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "tiny", work / "pairs.jsonl"
    if not (model / "config.json").exists():
        from prefpipe.tiny import build_tiny
        build_tiny(model, hidden_size=128, num_layers=2)
    if not data.exists():
        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from scale import write_pairs
        write_pairs(data, pairs)
    return model, data


def real_tokens(model: Path, data: Path, max_length: int) -> int:
    """Prompt + response tokens per scored response, by prefpipe's tokenization (both sides use these rows)."""
    from prefpipe.data.formats import Columns, Dataset
    from prefpipe.data.tokenize import PairTokenizer, TokenizeSettings, TokenStats
    from prefpipe.modeling import load_tokenizer
    pt = PairTokenizer(load_tokenizer(str(model)), TokenizeSettings(max_length, max_length // 2))
    n = 0
    for records in Dataset(str(data), Columns()).batches():
        c = pt.tokenize(records, TokenStats(), True)
        n += sum(2 * len(p) + len(a) + len(b) for p, a, b in zip(c["prompt_ids"], c["chosen_ids"], c["rejected_ids"]))
    return n


def run_prefpipe(args, model, data) -> dict:
    import subprocess
    import sys
    py = [sys.executable, "-m", "prefpipe"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    subprocess.run(py + ["precompute", "--model", str(model), "--data", str(data), "--out", str(args.work / "cache"),
                         "--max_length", str(args.max_length), "--no_progress", "--overwrite", "--device", "cpu",
                         "--dtype", "float32"], check=True, env=env)
    pre = time.perf_counter() - t0
    times = []
    for steps in (args.steps, 2 * args.steps):
        t0 = time.perf_counter()
        subprocess.run(py + ["train", "--model", str(model), "--cache", str(args.work / "cache"), "--out",
                             str(args.work / f"runs{steps}"), "--max_steps", str(steps), "--batch_size",
                             str(args.batch_size), "--eval_fraction", "0", "--save_every", "0", "--no_progress",
                             "--device", "cpu", "--dtype", "float32", "--lr", "1e-5"], check=True, env=env)
        times.append(time.perf_counter() - t0)
    return {"precompute_s": pre, "step_s": (times[1] - times[0]) / args.steps}


def run_trl(args, model, data) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    torch.set_num_threads(args.threads)
    ds = load_dataset("json", data_files=str(data), split="train").select_columns(["prompt", "chosen", "rejected"])
    times = []
    for steps in (args.steps, 2 * args.steps):
        policy = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        cfg = DPOConfig(output_dir=str(args.work / f"trl{steps}"), max_steps=steps, per_device_train_batch_size=
                        args.batch_size, precompute_ref_log_probs=True, max_length=args.max_length,
                        learning_rate=1e-5, report_to=[], save_strategy="no", logging_steps=10 ** 6,
                        use_cpu=True, dataloader_num_workers=0)
        t0 = time.perf_counter()
        DPOTrainer(model=policy, args=cfg, train_dataset=ds,
                   processing_class=AutoTokenizer.from_pretrained(str(model))).train()
        times.append(time.perf_counter() - t0)
    step = (times[1] - times[0]) / args.steps
    return {"precompute_s": times[0] - step * args.steps, "step_s": step}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", choices=("trl", "prefpipe"))
    ap.add_argument("--report", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/prefpipe-vs-trl"))
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.report:
        rows = {t: json.loads((args.report / f"{t}.json").read_text()) for t in ("prefpipe", "trl")
                if (args.report / f"{t}.json").exists()}
        for t, r in rows.items():
            print(f"{t:9} precompute {r['tokens'] / r['precompute_s']:9.0f} tokens/s   step {r['step_s']:.3f} s")
        return
    model, data = ensure_inputs(args.work, args.pairs)
    res = (run_trl if args.tool == "trl" else run_prefpipe)(args, model, data)
    res["tokens"] = real_tokens(model, data, args.max_length) if args.tool == "prefpipe" else json.loads(
        (args.work / "prefpipe.json").read_text())["tokens"] if (args.work / "prefpipe.json").exists() else None
    (args.work / f"{args.tool}.json").write_text(json.dumps(res))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
