"""prefpipe against TRL's `DPOTrainer(precompute_ref_log_probs=True)`: reference precompute tokens/s and training
step time on the same data, model, tokens and settings (outside CI; not run in the tests).

TRL lives in a virtual environment of its own, outside the repository, so it cannot change prefpipe's. Pin torch
first, then TRL installs against it (what was run for bench/RESULTS.md; on that CUDA-less machine pip resolved
torch 2.13.0 to its CPU build, no nvidia-* wheels: check that yours does too before a multi-GB download):

    python3 -m venv /work/trl-venv
    /work/trl-venv/bin/pip install torch==2.13.0
    /work/trl-venv/bin/pip install trl==1.16.0
    PYTHONPATH=. python bench/compare_trl.py --trl_python /work/trl-venv/bin/python --pairs 100 --steps 8 --reps 3

One invocation writes the inputs, then runs `--reps` rounds, each a fresh prefpipe process followed by a fresh
TRL process (alternating, so drift in machine load hits both), and prints the medians. Each process imports its
tool (prefpipe is imported from this checkout through PYTHONPATH in both environments, for the shared helpers),
then precomputes the reference log-probs of every pair and trains `--steps` optimizer steps from them.

Same for both sides:

- Data: `--pairs` random pairs with the log-normal lengths of chat preference data (`bench/precompute.py`'s
  `make_data`: prompt median 70 tokens, responses 80, tails cut at 700), written as text of whitespace-separated
  words of a word-level tokenizer, one token per word. So prefpipe's separate prompt/response tokenization and
  TRL's joint one give the same ids; the TRL process checks that its tokenized dataset equals prefpipe's
  `PairTokenizer` output row by row (BOS before the prompt, EOS after each response). `--max_length` 1536
  (prompt budget 768) truncates nothing; both processes check that too.
- Model: a random Llama (hidden 512, 4 layers, head_dim 64, vocab 32000: `bench/precompute.py`'s sizes), float32,
  CPU, `--threads` torch threads, dropout off.
- Training: sigmoid DPO, beta 0.1, AdamW (lr 1e-6, no weight decay), no warm-up, linear decay, gradient clipping
  at 1.0, `--batch_size` pairs per step, no gradient accumulation, no gradient checkpointing, no evaluation, no
  checkpoints. TRL's own defaults that differ (bf16, gradient checkpointing, fused AdamW) are turned off.
- Tokens: prompt + response per scored response (a prompt counts twice per pair), padding never counted.

Reported, per side: precompute tokens/s of the scoring pass alone (prefpipe: its backend's `score_pairs` calls;
TRL: its `_precompute_ref_logps` pass, collation and the Arrow cache it writes included) and of the whole set-up
(prefpipe: the `precompute` command in-process, model load, tokenization and Parquet writing included; TRL: model
load plus the `DPOTrainer` constructor, which tokenizes and precomputes); training step time (median over the
steps after the first: prefpipe's logged `step_time_s`, TRL's time between `on_step_end` callbacks) and training
tokens/s (real tokens of those steps over their time); peak RSS of the process (both phases). The two samplers draw
different pairs for a step, so tokens/s is the fairer training figure. The TRL process also reports the largest
difference between its reference sums and the prefpipe cache written just before (the same work, float32
round-off apart). Each tool keeps its defaults where they are a tool's design rather than a setting both share:
prefpipe packs a step's sequences padding-free and scores length-sorted batches of `--batch_tokens`, each
prompt once; TRL pads (its padding-free mode is off since its DPO refactor) and precomputes in batches of the
training batch size, in data order.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import resource
import statistics
import subprocess
import sys
import time

HERE = Path(__file__).resolve().parent
SPECIAL = ["<pad>", "<s>", "</s>"]


def word(i: int) -> str:
    return f"w{i}"


def build_model(out: Path, vocab: int, hidden: int, layers: int):
    """A word-level tokenizer (`<pad> <s> </s> w0 w1 ...`, BOS added like Llama's) and a random Llama."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab_map = {t: i for i, t in enumerate(SPECIAL + [word(i) for i in range(vocab - len(SPECIAL))])}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      head_dim=64, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    hf_tok.save_pretrained(str(out))


def write_pairs(path: Path, pairs: int, vocab: int):
    """Text rows whose words are `make_data`'s token ids; responses start with a space, so joining a prompt and
    a response as text (TRL) leaves the word boundary in place."""
    sys.path.insert(0, str(HERE))
    from precompute import make_data
    prompts, chosen, rejected = make_data(pairs, vocab - len(SPECIAL), 0, 1400)  # 1400: tails of 700
    text = lambda ids: " ".join(word(i) for i in ids)  # noqa: E731
    with open(path, "w") as f:
        for p, a, b in zip(prompts, chosen, rejected):
            f.write(json.dumps({"prompt": text(p), "chosen": " " + text(a), "rejected": " " + text(b)}) + "\n")


def prefpipe_ids(model: Path, data: Path, max_length: int):
    """prefpipe's tokenization of every row: (prompt_ids, chosen_ids, rejected_ids) lists, truncation counts."""
    from prefpipe.data.formats import Columns, Dataset
    from prefpipe.data.tokenize import PairTokenizer, TokenizeSettings, TokenStats
    from prefpipe.tokenizer import load_tokenizer
    pt = PairTokenizer(load_tokenizer(str(model)), TokenizeSettings(max_length, max_length // 2))
    out, stats = ([], [], []), TokenStats()
    for records in Dataset(str(data), Columns()).batches():
        c = pt.tokenize(records, stats, True)
        for col, key in zip(out, ("prompt_ids", "chosen_ids", "rejected_ids")):
            col.extend(c[key])
    return out, stats.to_dict()


def real_tokens(prompts, chosen, rejected) -> int:
    """Prompt + response per scored response: what both sides forward without padding."""
    return sum(2 * len(p) + len(a) + len(b) for p, a, b in zip(prompts, chosen, rejected))


def median_step(times: list[float], tokens: list[int]) -> dict:
    """Step time (median) and tokens/s over the steps after the first (kernel and allocator warm-up)."""
    t, n = times[1:], tokens[1:]
    return {"step_s": statistics.median(t), "train_tokens_per_s": sum(n) / sum(t), "steps_timed": len(t)}


def warm_imports():
    """Import what both sides load lazily before their clocks start: import time is neither tool's work."""
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401


class Timer:
    """Wraps `obj.name` so that every call adds its wall time to `self.s`."""

    def __init__(self, obj, name: str):
        self.s, self.calls, fn = 0.0, 0, getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s += time.perf_counter() - t
                self.calls += 1
        setattr(obj, name, timed)


def run_prefpipe(args) -> dict:
    import prefpipe.precompute.run as pre_run
    from prefpipe.cli import cli
    from prefpipe.precompute.hf_backend import HFBackend
    scoring, summaries = Timer(HFBackend, "score_pairs"), []
    inner = pre_run.run_precompute
    pre_run.run_precompute = lambda cfg: summaries.append(inner(cfg)) or summaries[-1]
    work, cache, runs = args.work, args.work / "pp-cache", args.work / "pp-runs"
    common = ["--model", str(work / "model"), "--device", "cpu", "--dtype", "float32", "--no_progress"]
    t0 = time.perf_counter()
    cli.main(["precompute", *common, "--data", str(work / "pairs.jsonl"), "--out", str(cache), "--overwrite",
              "--max_length", str(args.max_length)], standalone_mode=False)
    setup = time.perf_counter() - t0
    counts = summaries[-1]["counts"]
    assert counts["prompt_truncated"] == counts["response_truncated"] == counts["rows_skipped"] == 0, counts
    cli.main(["train", *common, "--cache", str(cache), "--out", str(runs), "--overwrite", "--loss_type", "dpo",
              "--beta", "0.1", "--lr", "1e-6", "--warmup_ratio", "0", "--lr_scheduler", "linear",
              "--max_grad_norm", "1.0", "--batch_size", str(args.batch_size), "--grad_accum", "1",
              "--max_steps", str(args.steps), "--drift_rows", "0", "--save_every", "0", "--seed", "0"],
             standalone_mode=False)
    steps = [json.loads(ln) for ln in (runs / "dpo-beta0.1" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["split"] == "train"]
    return {"tokens": counts["tokens_scored"], "pairs": counts["rows_written"], "scoring_s": scoring.s,
            "setup_s": setup, **median_step([s["step_time_s"] for s in steps], [s["tokens"] for s in steps])}


def check_trl_ids(ds, model: Path, data: Path, max_length: int) -> int:
    """TRL's tokenized rows must be prefpipe's, untruncated; returns their real tokens."""
    (p, a, b), stats = prefpipe_ids(model, data, max_length)
    assert stats["prompt_truncated"] == stats["response_truncated"] == 0, stats
    got = ds.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_dict()
    assert (got["prompt_ids"], got["chosen_ids"], got["rejected_ids"]) == (p, a, b), "TRL tokenized differently"
    assert max(len(x) + max(len(y), len(z)) for x, y, z in zip(p, a, b)) <= max_length
    return real_tokens(p, a, b)


def ref_agreement(ds, cache: Path) -> float:
    """Largest |TRL - prefpipe| reference log-prob sum over all responses (the cache of the prefpipe run before)."""
    import pyarrow.parquet as pq
    parts = [str(f) for f in sorted(cache.glob("part-*.parquet"))]
    t = pq.read_table(parts, columns=["prompt_ids", "chosen_ids", "ref_chosen", "ref_rejected"]).to_pydict()
    got = ds.select_columns(["prompt_ids", "chosen_ids", "ref_chosen_logps", "ref_rejected_logps"]).to_dict()
    assert (t["prompt_ids"], t["chosen_ids"]) == (got["prompt_ids"], got["chosen_ids"]), "rows in another order"
    return max(abs(x - y) for a, b in (("ref_chosen", "ref_chosen_logps"), ("ref_rejected", "ref_rejected_logps"))
               for x, y in zip(t[a], got[b]))


def trl_trainer(args, timers: dict):
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class StepClock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            timers["ends"].append(time.perf_counter())

    class Timed(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            timers["tokenized"] = dataset
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timers["scoring_s"] = time.perf_counter() - t
            return out

        def compute_loss(self, model, inputs, *a, **k):
            if model.training:  # real tokens of the micro-batch: its attention mask, padding excluded
                timers["step_tokens"].append(int(inputs["attention_mask"].sum()))
            return super().compute_loss(model, inputs, *a, **k)

    return Timed, StepClock


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig
    timers = {"ends": [], "step_tokens": []}
    Timed, StepClock = trl_trainer(args, timers)
    data, model_dir = args.work / "pairs.jsonl", args.work / "model"
    rows = [json.loads(ln) for ln in data.read_text().splitlines()]
    cfg = DPOConfig(output_dir=str(args.work / "trl-out"), max_steps=args.steps, per_device_train_batch_size=
                    args.batch_size, gradient_accumulation_steps=1, precompute_ref_log_probs=True,
                    max_length=args.max_length, loss_type=["sigmoid"], beta=0.1, learning_rate=1e-6,
                    weight_decay=0.0, warmup_steps=0, lr_scheduler_type="linear", max_grad_norm=1.0,
                    optim="adamw_torch", bf16=False, gradient_checkpointing=False, use_cpu=True, seed=0,
                    report_to="none", save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
                    dataloader_num_workers=0)
    t0 = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trainer = Timed(model=policy, args=cfg, train_dataset=Dataset.from_list(rows),
                    processing_class=AutoTokenizer.from_pretrained(str(model_dir)), callbacks=[StepClock()])
    setup = time.perf_counter() - t0
    tokens = check_trl_ids(timers["tokenized"], model_dir, data, args.max_length)
    cache = args.work / "pp-cache"
    diff = ref_agreement(trainer.train_dataset, cache) if cache.is_dir() else None
    t_train = time.perf_counter()
    trainer.train()
    ends = [t_train] + timers["ends"]  # step 1 includes train()'s set-up; it is not timed below
    assert len(timers["step_tokens"]) == args.steps, "one micro-batch per step expected"
    return {"tokens": tokens, "pairs": len(rows), "scoring_s": timers["scoring_s"], "setup_s": setup,
            "ref_max_abs_diff_vs_prefpipe": diff,
            **median_step([b - a for a, b in zip(ends, ends[1:])], timers["step_tokens"])}


def child(args):
    import torch
    torch.set_num_threads(args.threads)
    warm_imports()
    res = (run_trl if args.side == "trl" else run_prefpipe)(args)
    res.update(side=args.side, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               scoring_tokens_per_s=res["tokens"] / res["scoring_s"], setup_tokens_per_s=res["tokens"] / res["setup_s"])
    print("RESULT " + json.dumps(res), flush=True)


def spawn(args, side: str, python: str) -> dict:
    cmd = [python, __file__, "--side", side, "--work", str(args.work)]
    for k in ("max_length", "steps", "batch_size", "threads"):
        cmd += [f"--{k}", str(getattr(args, k))]
    n = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TQDM_DISABLE": "1",
           "HF_DATASETS_CACHE": str(args.work / f"hf-datasets-{side}"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{side} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    r = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    print(json.dumps(r), flush=True)
    return r


COLUMNS = [("scoring_tokens_per_s", "precompute tokens/s (scoring)", "{:,.0f}"),
           ("setup_tokens_per_s", "precompute tokens/s (load+tokenize+score+write)", "{:,.0f}"),
           ("step_s", "train step s (median)", "{:.3f}"),
           ("train_tokens_per_s", "train tokens/s", "{:,.0f}"),
           ("peak_rss_mb", "peak RSS MB", "{:,.0f}")]


def table(results: list[dict]) -> list[str]:
    """Markdown rows: per side the median of the runs, then every run, and prefpipe / TRL of the medians."""
    lines = ["| | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    med = {}
    for side in ("prefpipe", "trl"):
        runs = [r for r in results if r["side"] == side]
        med[side] = {k: statistics.median(r[k] for r in runs) for k, _, _ in COLUMNS}
        lines.append(f"| {side} (median of {len(runs)}) | " + " | ".join(
            f.format(med[side][k]) + " (" + ", ".join(f.format(r[k]) for r in runs) + ")" for k, _, f in COLUMNS)
            + " |")
    def ratio(k):
        return med["prefpipe"][k] / med["trl"][k] if "tokens" in k else med["trl"][k] / med["prefpipe"][k]
    lines.append("| prefpipe advantage | " + " | ".join(f"{ratio(k):.2f}x" for k, _, _ in COLUMNS[:4]) + " | |")
    return lines


def orchestrate(args):
    args.work.mkdir(parents=True, exist_ok=True)
    model, data = args.work / "model", args.work / "pairs.jsonl"
    if not (model / "config.json").exists():
        build_model(model, args.vocab, args.hidden, args.layers)
    write_pairs(data, args.pairs, args.vocab)
    (p, a, b), _ = prefpipe_ids(model, data, args.max_length)
    print(f"{len(p)} pairs, {real_tokens(p, a, b):,} tokens; median prompt {statistics.median(map(len, p))}, "
          f"response {statistics.median(map(len, a + b))}, longest sequence "
          f"{max(len(x) + max(len(y), len(z)) for x, y, z in zip(p, a, b))}", flush=True)
    results = []
    for _ in range(args.reps):
        results.append(spawn(args, "prefpipe", sys.executable))
        results.append(spawn(args, "trl", args.trl_python))
    assert len({r["tokens"] for r in results}) == 1, "the sides counted different tokens"
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(table(results)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trl_python", default="/work/trl-venv/bin/python", help="the TRL environment's python")
    ap.add_argument("--side", choices=("trl", "prefpipe"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, default=Path("/tmp/prefpipe-vs-trl"))
    ap.add_argument("--pairs", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    child(args) if args.side else orchestrate(args)


if __name__ == "__main__":
    main()
