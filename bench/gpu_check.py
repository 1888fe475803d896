"""Helpers for bench/gpu_check.sh: build the model and data, run one precompute command with measurements, and
print the final table. Needs only torch, transformers and pyarrow (the device image has no polars, no vLLM).

    python bench/gpu_check.py build WORK                      # model + tokenizer in WORK/model, WORK/pairs.jsonl
    python bench/gpu_check.py run NAME RESULTS WORK -- CMD... # run CMD, write RESULTS/NAME.json and NAME.log
    python bench/gpu_check.py table RESULTS WORK              # the summary table (and RESULTS/summary.json)

Sizes come from the environment, so the same script dry-runs on a CPU with a tiny model: ROWS (20000 pairs),
HIDDEN (896), LAYERS (24), HEADS (14), KV_HEADS (2), INTER (4864), VOCAB (151936): a random-init Qwen2-shaped model
of about 0.5B parameters with a real-sized vocabulary, saved in bf16. The tokenizer is prefpipe's offline
byte-level BPE (400 ids); the model's 150k-row embedding and LM head are what cost time and memory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

WORDS = ("the cat sat on a mat while seven quick foxes jumped over lazy dogs and birds sang songs of summer rain in "
         "gardens full of roses question answer plus minus times equals because therefore").split()


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# ---------------------------------------------------------------- build

def build(work: Path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefpipe.tiny import build_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    tok = build_tokenizer(model_dir)
    hidden, heads = env_int("HIDDEN", 896), env_int("HEADS", 14)
    config = Qwen2Config(
        vocab_size=max(env_int("VOCAB", 151936), len(tok)), hidden_size=hidden,
        intermediate_size=env_int("INTER", 4864), num_hidden_layers=env_int("LAYERS", 24),
        num_attention_heads=heads, num_key_value_heads=env_int("KV_HEADS", 2), max_position_embeddings=4096,
        tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising on the GPU takes a second, on the CPU a minute for 0.5B
        model = Qwen2ForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    n_params = sum(p.numel() for p in model.parameters())

    rows = env_int("ROWS", 20000)
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    # Log-normal word counts (long tails, like chat preference data); about 3 tokens per word with this tokenizer.
    words = lambda median, cap: max(1, min(cap, int(rng.lognormvariate(math.log(median), 0.6))))  # noqa: E731
    with open(work / "pairs.jsonl", "w") as f:
        for i in range(rows):
            f.write(json.dumps({"prompt": f"Q{i}: " + text(words(15, 100)), "chosen": text(words(25, 200)),
                                "rejected": text(words(25, 200))}) + "\n")
    info = {"params": n_params, "vocab": config.vocab_size, "hidden": hidden, "layers": config.num_hidden_layers,
            "heads": heads, "kv_heads": config.num_key_value_heads, "rows": rows, "built_on": device}
    (work / "build.json").write_text(json.dumps(info))
    print(f"model: Qwen2-shaped, {n_params / 1e6:.1f}M parameters, vocab {config.vocab_size}, bf16; data: {rows} pairs")


# ---------------------------------------------------------------- run

class GpuMemory:
    """Peak of `nvidia-smi`'s memory.used (MiB) on the first GPU while a command runs, minus the level before."""

    def __init__(self):
        self.ok = shutil.which("nvidia-smi") is not None
        self.baseline = self.peak = self._read() if self.ok else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _read(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", "0"], capture_output=True, text=True, timeout=10).stdout
            return int(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _poll(self):
        while not self._stop.wait(0.25):
            v = self._read()
            if v is not None:
                self.peak = max(self.peak or 0, v)

    def __enter__(self):
        if self.ok:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.ok:
            self._thread.join()

    def used_mib(self):
        if not self.ok or self.peak is None or self.baseline is None:
            return None
        return self.peak - self.baseline


def cache_numbers(cache: Path) -> dict:
    """Tokens from the manifest (or from the parts, if the run did not finish) and the steady-state rate: tokens of
    parts 2..n over the time between the first and the last part landing (no load, warm-up or first part)."""
    from prefpipe.data.cache import read_part_metadata
    parts = sorted(cache.glob("part-*.parquet"))
    metas = [(p.stat().st_mtime, (read_part_metadata(p) or {}).get("part", {})) for p in parts]
    metas.sort(key=lambda x: x[0])
    out = {"parts": len(parts), "tokens": sum(m.get("tokens_scored", 0) for _, m in metas)}
    manifest = cache / "manifest.json"
    if manifest.exists():
        counts = json.loads(manifest.read_text())["metadata"]["counts"]
        out.update(tokens=counts["tokens_scored"], rows=counts["rows_written"])
    if len(metas) >= 3:
        span = metas[-1][0] - metas[0][0]
        out["steady_tokens_per_s"] = sum(m.get("tokens_scored", 0) for _, m in metas[1:]) / span if span > 0 else None
    return out


def verify_report(cache: Path, model: Path, k: int) -> dict | None:
    """The verify report even when verify fails (the CLI then prints one error line only)."""
    from prefpipe.precompute.verify import VerifyFailed, verify_cache
    try:
        return verify_cache(str(cache), str(model), k)
    except VerifyFailed as e:
        return e.report


def run(name: str, results: Path, work: Path, cmd: list[str]):
    results.mkdir(parents=True, exist_ok=True)
    cache = work / f"cache-{name}"
    timeout = env_int("RUN_TIMEOUT", 300)
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    status = "ok"
    with GpuMemory() as gpu, open(results / f"{name}.log", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        for line in proc.stdout:  # streamed, so a killed run still leaves its log
            log.write(line)
            log.flush()
        proc.wait()
        timer.cancel()
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        status = f"timed out after {timeout} s" if wall >= timeout else f"exit {proc.returncode}"
    text = (results / f"{name}.log").read_text()
    summary = {"name": name, "status": status, "wall_s": wall, "gpu_mib": gpu.used_mib(),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
               **cache_numbers(cache)}
    summary["tokens_per_s"] = summary["tokens"] / wall if summary.get("tokens") else None
    report = None
    for line in text.splitlines():
        if line.startswith("verify:"):
            report = json.loads(line.removeprefix("verify:").strip())
    if report is None and (cache / "manifest.json").exists():
        report = verify_report(cache, work / "model", env_int("VERIFY", 64))
    summary["verify"] = report
    meta = cache / "manifest.json"
    if meta.exists():
        summary["backend"] = json.loads(meta.read_text())["metadata"]["backend"]
    (results / f"{name}.json").write_text(json.dumps(summary, indent=2))
    tail = "\n".join(text.strip().splitlines()[-6:])
    print(f"[{name}] {status}, {wall:.1f} s\n{tail}", flush=True)


# ---------------------------------------------------------------- table

def pair_drift(a: Path, b: Path) -> dict | None:
    """Per-row agreement of two finished caches: the sums, per sum and per token (sum difference / tokens)."""
    import pyarrow.parquet as pq
    if not ((a / "manifest.json").exists() and (b / "manifest.json").exists()):
        return None
    cols = ["row_id", "ref_chosen", "ref_rejected", "chosen_len", "rejected_len"]
    ta, tb = (pq.read_table(sorted(d.glob("part-*.parquet")), columns=cols).to_pydict() for d in (a, b))
    if ta["row_id"] != tb["row_id"]:
        return {"error": "row ids differ"}
    per_sum, per_tok = [], []
    for s, n in (("ref_chosen", "chosen_len"), ("ref_rejected", "rejected_len")):
        for x, y, k in zip(ta[s], tb[s], ta[n]):
            per_sum.append(abs(x - y))
            per_tok.append(abs(x - y) / k)
    return {"per_sum_max": max(per_sum), "per_sum_mean": sum(per_sum) / len(per_sum),
            "per_token_max": max(per_tok), "per_token_mean": sum(per_tok) / len(per_tok)}


def fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def table(results: Path, work: Path):
    import torch
    rows = [json.loads((results / f"{n}.json").read_text()) for n in ("hf", "vllm") if (results / f"{n}.json").exists()]
    build_info = json.loads((work / "build.json").read_text())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"no GPU ({platform.processor() or 'cpu'}, {os.cpu_count()} cores)"
    lines = [f"machine: {gpu}; torch {torch.__version__}",
             f"model: random-init Qwen2 shape, {build_info['params'] / 1e6:.1f}M params, vocab {build_info['vocab']}, "
             f"{build_info['layers']} layers x {build_info['hidden']}; data: {build_info['rows']} pairs; scoring dtype "
             f"{os.environ.get('DTYPE', 'bfloat16')}", ""]
    head = (f"{'backend':8} {'status':10} {'tokens':>12} {'wall s':>8} {'tok/s all':>10} {'tok/s steady':>12} "
            f"{'GPU MiB':>8} {'RSS MiB':>8}  verify vs float32 (per token max / mean; per sum max / mean)")
    lines += [head, "-" * len(head)]
    for r in rows:
        if r.get("status", "").startswith("vllm:"):
            lines.append(f"{r['name']:8} {r['status']}")
            continue
        v = r.get("verify")
        drift = ("-" if not v else f"{'pass' if v['passed'] else 'FAIL'} {v['per_token']['max']:.2e} / "
                 f"{v['per_token']['mean']:.2e}; {v['per_sum']['max']:.3g} / {v['per_sum']['mean']:.3g} "
                 f"({v['rows']} rows)")
        lines.append(f"{r['name']:8} {r['status']:10} {fmt(r.get('tokens')):>12} {r['wall_s']:>8.1f} "
                     f"{fmt(r.get('tokens_per_s')):>10} {fmt(r.get('steady_tokens_per_s')):>12} "
                     f"{fmt(r.get('gpu_mib')):>8} {fmt(r.get('peak_rss_mib')):>8}  {drift}")
    both = pair_drift(work / "cache-hf", work / "cache-vllm")
    if both and "error" not in both:
        lines.append(f"hf vs vllm caches: per token max {both['per_token_max']:.2e} mean {both['per_token_mean']:.2e}; "
                     f"per sum max {both['per_sum_max']:.3g} mean {both['per_sum_mean']:.3g}")
    elif both:
        lines.append(f"hf vs vllm caches: {both['error']}")
    lines.append("tok/s all: whole command (load, fingerprint, tokenize, write, verify included); steady: parts 2..n."
                 " GPU MiB: peak nvidia-smi memory.used over the run minus before (vLLM reserves"
                 " --gpu_memory_utilization of the GPU up front).")
    print("\n".join(lines))
    (results / "summary.json").write_text(json.dumps({"build": build_info, "runs": rows, "hf_vs_vllm": both},
                                                     indent=2))


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "build":
        build(Path(args[0]))
    elif cmd == "run":
        sep = args.index("--")
        run(args[0], Path(args[1]), Path(args[2]), args[sep + 1:])
    elif cmd == "table":
        table(Path(args[0]), Path(args[1]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
