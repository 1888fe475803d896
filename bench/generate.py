"""Benchmark: generation tokens/s of `prefpipe generate`'s hf sampler against a plain per-prompt loop, same model,
prompts and sampling settings, in one invocation; optionally the whole `prefpipe generate` command, hf against vLLM.

In-process (the default): `HfGenerator.generate` over all prompts (length-sorted batches of `--batch_size`
sequences, left-padded, K samples per prompt in one call) against the loop a first implementation writes:
`model.generate` on one prompt at a time with `num_return_sequences=K`. Both get the same `max_new_tokens`,
temperature, top-p and top-k, and the model's generation config sets `min_new_tokens = max_new_tokens`, which
both inherit, so neither may stop early: a random model rarely emits a stop token, and a batch that kept going
for one unfinished row would otherwise count differently from the loop. Generated tokens are counted from the
returned ids (each completion up to and including its first stop id) and checked equal on both sides. Reps
alternate ours/baseline so drift in machine load hits both; the median of `--reps` is reported. A greedy check
first runs both on `--check_tokens` tokens without `min_new_tokens` and counts prompts whose completions agree.

`--cli`: the whole `prefpipe generate` command, each run a fresh process with a fresh `--out`, `--backend hf` in
this interpreter against `--backend vllm` in `--vllm_python`, alternating; wall time from process start to exit
(imports, model load, engine start, sampling, judging, writing), tokens counted from each output's samples.

The model is a random-init Llama from prefpipe.tiny (byte-level BPE vocabulary of 400; hidden 256, 4 layers,
4 heads of 64 by default), the prompts random words of log-normal length. Usage:

    python bench/generate.py                                   # CPU float32: the numbers in bench/RESULTS.md
    python bench/generate.py --cli --vllm_python .venv-vllm/bin/python --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # prefpipe importable from this checkout without an install

WORDS = ("the a cat sat on mat while seven quick foxes jumped over lazy dogs and birds sang songs of summer rain "
         "in gardens full roses question what is plus minus answer policy reference model train").split()


def make_prompts(n: int, seed: int, median_words: int) -> list[dict]:
    """`n` prompt rows of random words, log-normal lengths (median `median_words`, 2 to 5x that)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median_words), 0.8, n), 2, 5 * median_words).astype(int)
    return [{"prompt": " ".join(rng.choice(WORDS, int(k))), "answer": "#### 1"} for k in lengths]


def build_model(work: Path, args) -> Path:
    from prefpipe.tiny import build_model as build, build_tokenizer
    d = work / "model"
    if not (d / "config.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        build(d, build_tokenizer(d), hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64,
              head_dim=64, intermediate_size=args.hidden * 11 // 4)
    return d


def write_prompts(work: Path, args) -> Path:
    path = work / "prompts.jsonl"
    rows = make_prompts(args.prompts, args.seed, args.median_words)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def generated(ids: list[int], stops: set[int]) -> int:
    """Tokens the model produced in one continuation: up to and including its first stop id."""
    for i, t in enumerate(ids):
        if t in stops:
            return i + 1
    return len(ids)


def baseline(model, prompt_ids, sampling, stops, pad, min_new=None):
    """One `model.generate` per prompt, K sequences each; the continuations' ids, per prompt."""
    import torch
    kw = {"do_sample": False} if sampling.temperature == 0 else {
        "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
        "top_k": sampling.top_k or None}
    if min_new is not None:
        kw["min_new_tokens"] = min_new
    out = []
    with torch.inference_mode():
        for p in prompt_ids:
            ids = torch.tensor([p])
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad,
                                 max_new_tokens=sampling.max_new_tokens,
                                 num_return_sequences=1 if sampling.temperature == 0 else sampling.num_samples,
                                 eos_token_id=sorted(stops), **kw)
            out.append(gen[:, len(p):].tolist())
    return out


def greedy_check(model, tok, prompt_ids, args) -> tuple[int, int]:
    """Prompts whose greedy completion (first of K) is the same from both, and how many were compared."""
    from prefpipe.generation.config import SamplingSettings
    from prefpipe.generation.hf_sampler import HfGenerator
    s = SamplingSettings(num_samples=2, temperature=0.0, max_new_tokens=args.check_tokens)
    ours = HfGenerator(model, tok, s, args.batch_size).generate(prompt_ids, 0)
    stops = HfGenerator(model, tok, s, args.batch_size).stops
    base = baseline(model, prompt_ids, s, stops, tok.pad_token_id)
    same = sum(o[0][0] == b[0][:generated(b[0], stops)] for o, b in zip(ours, base))
    return same, len(prompt_ids)


def in_process(args, work: Path):
    import torch
    from prefpipe.data.tokenize import PairTokenizer
    from prefpipe.generation.config import SamplingSettings
    from prefpipe.generation.hf_sampler import HfGenerator
    from prefpipe.modeling import load_model
    from prefpipe.tokenizer import load_tokenizer

    torch.set_num_threads(args.threads)
    model_dir = build_model(work, args)
    tok = load_tokenizer(str(model_dir))
    prompt_ids = PairTokenizer(tok).encode_prompts([r["prompt"] for r in make_prompts(args.prompts, args.seed,
                                                                                       args.median_words)])
    model = load_model(str(model_dir), dtype=torch.float32).eval()
    n_params = sum(p.numel() for p in model.parameters())
    lens = sorted(map(len, prompt_ids))
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab {len(tok)}, {n_params / 1e6:.1f}M "
          f"params, float32 CPU, {args.threads} threads")
    print(f"prompts: {len(prompt_ids)}, tokens {lens[0]}-{lens[-1]} (median {statistics.median(lens)}, total "
          f"{sum(lens)}); K={args.samples}, max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, "
          f"top_p {args.top_p}, top_k {args.top_k}; ours: batch_size {args.batch_size} sequences", flush=True)
    same, n = greedy_check(model, tok, prompt_ids, args)
    print(f"greedy check ({args.check_tokens} tokens): {same}/{n} prompts identical from both", flush=True)

    s = SamplingSettings(num_samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, max_new_tokens=args.max_new_tokens)
    gen = HfGenerator(model, tok, s, args.batch_size)
    model.generation_config.min_new_tokens = args.max_new_tokens  # both inherit it: no early stop on either side

    def ours():
        return sum(len(ids) for comps in gen.generate(prompt_ids, args.seed) for ids, _ in comps)

    def base():
        return sum(generated(seq, gen.stops) for per in baseline(model, prompt_ids, s, gen.stops, gen.pad)
                   for seq in per)

    gen.generate(prompt_ids[:2], 0)  # warm-up: one small call each
    baseline(model, prompt_ids[:1], s, gen.stops, gen.pad)
    runs = {"ours": [], "baseline": []}
    for rep in range(args.reps):
        for name, fn in (("ours", ours), ("baseline", base)):
            t = time.perf_counter()
            tokens = fn()
            wall = time.perf_counter() - t
            runs[name].append((tokens, wall))
            print(f"  rep {rep + 1} {name:8} {tokens} tokens {wall:7.2f} s  {tokens / wall:8.1f} tokens/s", flush=True)
    want = len(prompt_ids) * args.samples * args.max_new_tokens
    counts = {t for rs in runs.values() for t, _ in rs}
    assert counts == {want}, f"generated-token counts differ: {counts} (expected {want})"
    med = {k: statistics.median(t / w for t, w in rs) for k, rs in runs.items()}
    print(f"generation tokens/s, median of {args.reps} ({want} tokens a run, counted from the ids):")
    for k in runs:
        print(f"  {k:8} {med[k]:8.1f}  (runs: {', '.join(f'{t / w:.1f}' for t, w in runs[k])})")
    pairs = [(to / wo) / (tb / wb) for (to, wo), (tb, wb) in zip(runs["ours"], runs["baseline"])]
    print(f"  ours / baseline: {med['ours'] / med['baseline']:.2f}x (per rep: "
          f"{', '.join(f'{x:.2f}x' for x in pairs)})")


def cli_command(python: str, backend: str, model: Path, data: Path, out: Path, args) -> list[str]:
    return [python, "-m", "prefpipe", "generate", "--backend", backend, "--model", str(model), "--data", str(data),
            "--out", str(out), "--num_samples", str(args.samples), "--max_new_tokens", str(args.max_new_tokens),
            "--temperature", str(args.temperature), "--top_p", str(args.top_p), "--top_k", str(args.top_k),
            "--dtype", "auto", "--no_progress"]


def output_tokens(out: Path) -> int:
    """Generated tokens in an output: every kept sample's ids, plus one for each sample that was only a stop id
    (dropped as empty, counted in the manifest)."""
    import pyarrow.parquet as pq
    kept = sum(len(ids) for p in sorted((out / "samples").glob("part-*.parquet"))
               for ids in pq.read_table(p, columns=["completion_ids"]).column(0).to_pylist())
    counts = json.loads((out / "manifest.json").read_text())["summary"]["sample_counts"]
    return kept + counts.get("empty_completion", 0)


def whole_commands(args, work: Path):
    model, data = build_model(work, args), write_prompts(work, args)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    pythons = {"hf": sys.executable, "vllm": args.vllm_python}
    runs: dict[str, list] = {b: [] for b in pythons}
    for rep in range(args.reps + 1):  # the first round warms the page cache and is not counted
        for backend, py in pythons.items():
            out = work / f"out-{backend}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            res = subprocess.run(cli_command(py, backend, model, data, out, args), env=env, capture_output=True,
                                 text=True)
            wall = time.perf_counter() - t
            if res.returncode != 0:
                raise SystemExit(f"{backend} failed:\n{res.stderr[-3000:]}")
            tokens = output_tokens(out)
            print(f"  {'warm-up' if rep == 0 else f'rep {rep}':7} {backend:4} {wall:7.2f} s  {tokens} tokens",
                  flush=True)
            if rep:
                runs[backend].append((tokens, wall))
    print(f"whole command, median of {args.reps}:")
    for b, rs in runs.items():
        wall = statistics.median(w for _, w in rs)
        print(f"  {b:4} {wall:7.2f} s  {rs[0][0]} tokens  {rs[0][0] / wall:8.1f} tokens/s (whole command)")


def machine() -> str:
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--median_words", type=int, default=20, help="median prompt length in words")
    ap.add_argument("--samples", type=int, default=4, help="K: completions per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_p", type=float, default=0.95)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--batch_size", type=int, default=64, help="ours: sequences per generate call")
    ap.add_argument("--check_tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust when other jobs share the cores)")
    ap.add_argument("--work", default="/tmp/prefpipe-bench-generate")
    ap.add_argument("--cli", action="store_true", help="time the whole commands instead (needs --vllm_python)")
    ap.add_argument("--vllm_python", help="the vLLM environment's python (.ci/vllm-env.sh)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print("machine:", machine(), flush=True)
    if args.cli:
        if not args.vllm_python:
            ap.error("--cli needs --vllm_python")
        whole_commands(args, work)
    else:
        in_process(args, work)
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
