"""`prefpipe eval`: held-out implicit-reward accuracy on a cache, and downstream accuracy by greedy generation.

Decisions a user needs to know:

- **RUN** is a run directory written by `prefpipe train` (its trained model is `RUN/final` and its beta is read
  from `RUN/result.json`), `RUN/final` itself, or any model directory (beta from the `train_config.json` prefpipe
  saves next to the models it writes, else `--beta`). Results go to `eval_pref.json` and `eval_gen.json` /
  `eval_gen.jsonl` in RUN, where `prefpipe report` finds them, or in `--out`. A plain model directory is never
  written into: its results go to `./eval-<model dir name>/` without `--out`.
- **Implicit reward.** For each held-out pair, `Δ = (π_c − ρ_c) − (π_r − ρ_r)` from summed log-probs, with the
  reference `ρ` read from the cache. A pair is a tie when `|Δ| <= 1e-4` nats and a win when `Δ > 1e-4`: the
  same model scored in another batch layout than the cache's (packed or padded, other batch sizes) differs from
  it by float rounding, about 1e-6 nats per token, which must not count as preferring anything. `acc` is the
  fraction of wins (so the SFT model itself scores 0, and the report says that every pair ties), `margin` the
  mean of `βΔ`; `wins` and `ties` are counted too. The cache must come from the same tokenizer as the
  model, or the ids would mean other tokens; that is checked.
- **Downstream accuracy.** Greedy decoding, `--max_new_tokens` per question, exact match of the final number
  (prefpipe.answers documents the extraction and its fallback). Every question, generation, extracted
  number and verdict is written, one JSON object per line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prefpipe.data.cache import read_cache
from prefpipe.data.identity import tokenizer_mismatch
from prefpipe.data.tokenize import chat_template_kwargs, check_template_date
from prefpipe.errors import UserError
from prefpipe.evaluation.generate import encode_prompts, hf_generate, pick_engine, vllm_generate
from prefpipe.evaluation.settings import GenSettings
from prefpipe.fileio import atomic_write_text
from prefpipe.modeling import load_model, resolve_device, resolve_dtype
from prefpipe.progress_bar import progress_bar
from prefpipe.rundir import CONFIG, FINAL, RunDir
from prefpipe.answers import extract_answer, gold_answer
from prefpipe.scoring import rows_budget, score_cache_rows, score_sequences
from prefpipe.tokenizer import load_tokenizer, quiet_transformers
from prefpipe.wording import plural

@dataclass
class Run:
    path: Path  # where results are written by default
    model_dir: Path
    name: str
    beta: float | None
    loss_type: str | None


def _is_model(d: Path) -> bool:
    """A Hugging Face model directory or a PEFT adapter directory (loaded merged into its base)."""
    return (d / "config.json").exists() or (d / "adapter_config.json").exists()


def resolve_run(run: str | Path) -> Run:
    """A training run directory (with result.json and final/, which a LoRA run fills with its adapter), a run's
    `final/` or checkpoint directory, or a plain model or PEFT adapter directory.

    Results of a run (given as RUN or as RUN/final) go to RUN. A plain model directory is not written into (it may
    be a downloaded or shared model): its results go to `./eval-<name>/` unless `--out` says otherwise. The beta
    comes from the run's result.json, or from the `train_config.json` that train saves next to every model it
    writes; `--beta` is needed only for a model prefpipe did not train."""
    p = Path(run)
    if not p.is_dir():
        raise UserError("no such run or model directory", file=str(p))
    if not RunDir(p).result.exists() and (p / "config.json").exists() and p.name == FINAL \
            and RunDir(p.parent).result.exists():
        p = p.parent  # RUN/final: the run itself
    rd = RunDir(p)
    result = rd.result
    if result.exists():
        try:
            r = json.loads(result.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"result.json is not valid JSON ({e})", file=str(result))
        model_dir = rd.final
        if not _is_model(model_dir):
            raise UserError("this run has no final model (RUN/final); did training finish?", file=str(p))
        beta, loss_type = r.get("beta"), r.get("loss_type")
        if beta is None:
            beta, loss_type = _trained_beta(model_dir)
        return Run(p, model_dir, r.get("name", p.name), beta, loss_type)
    if not _is_model(p):
        raise UserError("neither a training run (result.json) nor a model directory (config.json or "
                        "adapter_config.json)", file=str(p))
    beta, loss_type = _trained_beta(p)
    return Run(Path(f"eval-{p.resolve().name}"), p, p.name, beta, loss_type)


def _trained_beta(model_dir: Path) -> tuple[float | None, str | None]:
    """The beta and loss type in the train_config.json prefpipe saves with a model it trained, else (None, None)."""
    try:
        loss = json.loads((model_dir / CONFIG).read_text())["loss"]
        return float(loss["beta"]), loss.get("loss_type")
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _load(model_dir: Path, device: str, dtype: str):
    quiet_transformers()
    dev = resolve_device(device)
    model = load_model(str(model_dir), resolve_dtype(dtype, dev), dev).eval()
    return model, load_tokenizer(str(model_dir)), dev


# ---------------------------------------------------------------- implicit reward on a cache

# |Δ| at or below this many nats is a tie, not a win: the reference scored against its own cache differs from it
# only by float rounding of the summed log-probs.
TIE_NATS = 1e-4


def pref_line(res: dict) -> str:
    """The one-line report of `eval_preference`, saying so when every pair ties (a model equal to the reference)."""
    n = res["rows"]
    line = (f"{res['run']}: held-out reward accuracy {res['acc']:.4f} ({res['wins']} of {plural(n, 'pair')} strictly "
            f"preferred), margin {res['margin']:.4f} (beta {res['beta']:g})")
    if n and res["ties"] == n:
        line += (f"; all {n} pairs tie (the policy scores exactly as the cached reference: is this the reference "
                 "model itself?)")
    elif res["ties"]:
        line += f"; {plural(res['ties'], 'tie')}"
    return line


@torch.inference_mode()
def eval_preference(run: Run, cache_dir: str, *, beta: float | None = None, batch_size: int = 32,
                    device: str = "auto", dtype: str = "auto") -> dict:
    """Implicit-reward accuracy and margin of `run` on a paired cache with reference log-probs.

    A forward holds at most the padded tokens of `batch_size` pairs at the cache's longest sequence; sequences are
    packed by length (`prefpipe.scoring`), so shorter pairs share a forward with more others."""
    beta = beta if beta is not None else run.beta
    if beta is None:
        raise UserError("no beta: this model was not trained by prefpipe (no result.json or train_config.json), "
                        "so pass --beta", file=str(run.model_dir))
    cache = read_cache(cache_dir)
    if cache.kind != "paired":
        raise UserError("implicit-reward accuracy needs a paired cache (this one holds KTO examples)",
                        file=cache_dir)
    if not cache.has_reference:
        raise UserError("this cache has no reference log-probs (precompute --no_reference); rerun precompute "
                        "with the reference model", file=cache_dir)
    model, tok, dev = _load(run.model_dir, device, dtype)
    diff = tokenizer_mismatch(cache.metadata, tok)
    if diff:
        raise UserError(f"the cache was tokenized with another tokenizer ({', '.join(diff)} differ) than "
                        f"{run.model_dir}", file=cache_dir)
    t = cache.table
    spec = cache.spec
    start = time.perf_counter()

    def score(prompts, responses):
        # `batch_size` pairs at the longest length bound each forward, as the fixed-size batches before did.
        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        return score_sequences(model, prompts, responses,
                               batch_tokens=rows_budget(batch_size, len(spec.responses), lengths),
                               pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0, device=dev)
    got = score_cache_rows(lambda c: t.column(c).to_pylist(), cache.kind, score)
    pol, ref = {}, {}
    for r in spec.responses:
        pol[r.name] = torch.tensor(got[r.name].sums, dtype=torch.float64)
        ref[r.name] = torch.tensor(t.column(r.ref).to_pylist(), dtype=torch.float64)
    pol_c, pol_r, ref_c, ref_r = pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"]
    delta = (pol_c - ref_c) - (pol_r - ref_r)
    return {"run": run.name, "model": str(run.model_dir), "cache": str(cache_dir), "beta": beta,
            "rows": t.num_rows, "wins": int((delta > TIE_NATS).sum()), "ties": int((delta.abs() <= TIE_NATS).sum()),
            "acc": float((delta > TIE_NATS).double().mean()),
            "margin": float((beta * delta).mean()), "r_chosen": float((beta * (pol_c - ref_c)).mean()),
            "r_rejected": float((beta * (pol_r - ref_r)).mean()), "wall_s": round(time.perf_counter() - start, 2)}


# ---------------------------------------------------------------- downstream generation

def read_questions(path: str | Path, s: GenSettings) -> list[dict]:
    """GSM8K-style JSONL rows as {row, question, answer, gold}; a bad row is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise UserError("no such file", file=str(p))
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"not valid JSON ({e.msg})", file=str(p), row=n)
            if not isinstance(obj, dict):
                raise UserError("expected a JSON object", file=str(p), row=n)
            for col in (s.question_col, s.answer_col):
                if not isinstance(obj.get(col), str) or not obj[col].strip():
                    raise UserError("missing or empty text", file=str(p), row=n, column=col)
            gold = gold_answer(obj[s.answer_col])
            if gold is None:
                raise UserError("no final number after '#### ' (GSM8K format)", file=str(p), row=n,
                                column=s.answer_col)
            rows.append({"row": n, "question": obj[s.question_col], "answer": obj[s.answer_col], "gold": gold})
            if s.limit is not None and len(rows) >= s.limit:
                break
    if not rows:
        raise UserError("file has no rows", file=str(p))
    return rows


def render_prompts(tokenizer, questions: list[str], s: GenSettings) -> list[str]:
    if s.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat needs a tokenizer with a chat template; this one has none")
        check_template_date(tokenizer.chat_template)
        dated = chat_template_kwargs(s.chat_date)
        return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True, **dated) for q in questions]
    if "{question}" not in s.prompt_template:
        raise UserError(f"--prompt_template must contain {{question}} (got {s.prompt_template!r})")
    return [s.prompt_template.replace("{question}", q) for q in questions]


def score_generations(rows: list[dict], generations: list[str]) -> tuple[dict, list[dict]]:
    """Verdicts per row and the summary counts."""
    records, correct, rules = [], 0, {"marker": 0, "last_number": 0, "none": 0}
    for r, g in zip(rows, generations):
        pred, rule = extract_answer(g)
        ok = pred is not None and pred == r["gold"]
        correct += ok
        rules[rule] += 1
        records.append({"row": r["row"], "question": r["question"], "gold": r["gold"], "generation": g,
                        "prediction": pred, "rule": rule, "correct": ok})
    n = len(rows)
    return {"n": n, "correct": correct, "accuracy": correct / n, "extraction": rules}, records


def eval_generation(run: Run, gen_file: str, s: GenSettings, out_dir: str | Path | None = None,
                    log=None) -> dict:
    """Greedy exact-match accuracy of `run` on `gen_file`; writes eval_gen.json and eval_gen.jsonl."""
    rows = read_questions(gen_file, s)
    engine = pick_engine(s.engine)
    start = time.perf_counter()
    quiet_transformers()
    tok = load_tokenizer(str(run.model_dir))
    prompt_ids = encode_prompts(tok, render_prompts(tok, [r["question"] for r in rows], s))
    if engine == "vllm":
        gens = vllm_generate(str(run.model_dir), tok, prompt_ids, max_new_tokens=s.max_new_tokens, dtype=s.dtype)
    else:
        model, tok, _ = _load(run.model_dir, s.device, s.dtype)
        with progress_bar(len(prompt_ids), f"generate {run.name}", "question", show=None) as bar:
            gens = hf_generate(model, tok, prompt_ids, max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                               progress=bar.update)
    summary, records = score_generations(rows, [g[0] for g in gens])
    summary = {"run": run.name, "model": str(run.model_dir), "data": str(gen_file), "engine": engine,
               **summary, "settings": asdict(s), "wall_s": round(time.perf_counter() - start, 2)}
    out = RunDir(out_dir if out_dir is not None else run.path)
    out.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.eval_gen_rows, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out.eval_gen, json.dumps(summary, indent=2))
    return summary
