"""`run_pipeline(cfg)`: phase one when needed, every (loss type, beta) run, evaluation, summary and plots.

Decisions a user needs to know:

- **Cache reuse.** A cache is reused when its manifest's fingerprints of the model (config and weights), the
  tokenizer, the tokenization settings and the data (bytes and column mapping) all match this run, and it holds
  what the losses need (pairs or KTO examples, with reference log-probs). Anything else recomputes it, replacing
  the old parts; the log says which happened and what differed. An unfinished cache from the same run resumes.
  Backend, dtype and batch size are not part of the check: they change numerics, not meaning.
- **Which caches.** Paired losses that need a reference (dpo, ipo, hinge) share one paired cache; reference-free
  losses (orpo, sft) train from it too when it exists, and from the data directly when no loss needs it (an
  ORPO-only pipeline runs no phase one). kto has its own cache of single examples with pinned partners, made
  from `kto_data` (or from `data`, two examples per pair). `eval_data` gets a third cache for held-out metrics.
- **Reruns** retrain every run of the sweep, replacing the earlier run directories of the same names (other runs
  in RUNS_DIR are left alone); with `resume = true` finished runs are kept and interrupted ones continue.
- **Outputs** (layout in prefpipe.rundir). RUNS_DIR holds the runs (`<loss>-beta<beta>/`, or `orpo/`, `sft/`),
  `summary.json` (every trained run, as `prefpipe train` writes it), `pipeline.json` (this pipeline's caches,
  settings, runs, evaluations and timings), `reference/eval_gen.json` for the SFT model, and the report's plots
  and `summary.md`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from prefpipe.data.cache import MANIFEST, read_manifest, read_part_metadata
from prefpipe.errors import UserError
from prefpipe.pipeline.config import PipelineConfig
from prefpipe.rundir import RunsDir
from prefpipe.fileio import atomic_write_text
from prefpipe.train.loss_names import REFERENCE_FREE


@dataclass
class CacheCheck:
    path: str
    action: str  # "reuse" | "compute" | "recompute" | "resume"
    reason: str

    def line(self) -> str:
        verb = {"reuse": "reusing", "compute": "computing", "recompute": "recomputing",
                "resume": "resuming"}[self.action]
        return f"cache {self.path}: {verb} ({self.reason})"


def expected_identity(model: str, data: str, cfg: PipelineConfig) -> dict:
    """The four fingerprints a cache made by this run would carry."""
    from prefpipe.data.fingerprint import model_fingerprint, resolve_model_dir, tokenizer_fingerprint
    from prefpipe.data.formats import data_fingerprint
    from prefpipe.data.tokenize import TokenizeSettings
    from prefpipe.modeling import load_tokenizer

    tok = load_tokenizer(str(resolve_model_dir(model)))
    return {
        "model": model_fingerprint(model),
        "tokenizer": tokenizer_fingerprint(tok)["fingerprint"],
        "tokenization": TokenizeSettings(cfg.max_length, cfg.max_prompt_length).metadata(),
        "data": data_fingerprint(data, columns_of(cfg)),
        "turn_marker": cfg.turn_marker,
    }


def _identity_of(meta: dict) -> dict:
    return {"model": meta.get("model", {}).get("fingerprint"),
            "tokenizer": meta.get("tokenizer", {}).get("fingerprint"),
            "tokenization": meta.get("tokenization"),
            "data": meta.get("data", {}).get("fingerprint"),
            "turn_marker": meta.get("data", {}).get("turn_marker")}


def _differences(expected: dict, found: dict) -> list[str]:
    out = []
    for key in ("model", "tokenizer", "tokenization", "data", "turn_marker"):
        a, b = found.get(key), expected[key]
        if a == b:
            continue
        if key == "tokenization" and isinstance(a, dict):
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append("tokenization settings differ (" + ", ".join(f"{k}: cache {a.get(k)}, now {b.get(k)}"
                                                                   for k in keys) + ")")
        elif isinstance(a, str) and isinstance(b, str):
            out.append(f"{key} fingerprint differs (cache {a[:12]}, now {b[:12]})")
        else:
            out.append(f"{key} differs")
    return out


def _mismatches(expected: dict, meta: dict, *, kto: bool, needs_reference: bool) -> list[str]:
    """Why a cache with metadata `meta` cannot serve this run (empty when it can)."""
    diff = _differences(expected, _identity_of(meta))
    if (meta.get("kind") == "unpaired") != kto:
        diff.append(f"it holds {'KTO examples' if meta.get('kind') == 'unpaired' else 'pairs'}, "
                    f"this run needs {'KTO examples' if kto else 'pairs'}")
    if needs_reference and not meta.get("has_reference", True):
        diff.append("it has no reference log-probs")
    return diff


def check_cache(path: str, expected: dict, *, kto: bool, needs_reference: bool, recompute: bool) -> CacheCheck:
    """Decide whether the cache at `path` can serve this run, and say why."""
    d = Path(path)
    if recompute:
        return CacheCheck(path, "recompute", "--recompute was given")
    if not d.exists() or not any(d.iterdir()):
        return CacheCheck(path, "compute", "no cache there yet")
    if not (d / MANIFEST).exists():
        parts = sorted(d.glob("part-*.parquet"))
        meta = read_part_metadata(parts[0]) if parts else None
        if meta is not None and not _mismatches(expected, meta, kto=kto, needs_reference=needs_reference):
            return CacheCheck(path, "resume", f"an unfinished cache of this run: {len(parts)} parts done")
        return CacheCheck(path, "recompute", "an unfinished cache from a different run")
    try:
        meta = read_manifest(d)["metadata"]
    except UserError as e:
        return CacheCheck(path, "recompute", f"the old cache is unreadable: {e.message}")
    diff = _mismatches(expected, meta, kto=kto, needs_reference=needs_reference)
    if diff:
        return CacheCheck(path, "recompute", "; ".join(diff))
    return CacheCheck(path, "reuse", "model, tokenizer, tokenization and data fingerprints match")


def columns_of(cfg: PipelineConfig):
    from prefpipe.pipeline.config import columns_of as build_columns
    return build_columns(cfg)


def ensure_cache(cfg: PipelineConfig, path: str, data: str, *, kto: bool, log) -> CacheCheck:
    """Phase one for one cache, only when `check_cache` says so."""
    from prefpipe.pipeline.config import precompute_config
    from prefpipe.precompute.run import run_precompute

    check = check_cache(path, expected_identity(cfg.model, data, cfg), kto=kto, needs_reference=True,
                        recompute=cfg.recompute)
    log(check.line())
    if check.action == "reuse":
        return check
    pc = precompute_config(cfg, path, data, kto=kto, overwrite=check.action == "recompute")
    summary = run_precompute(pc)
    counts = summary.get("counts") or {}
    log(f"cache {path}: wrote {counts.get('rows_written', '?')} rows "
        f"({counts.get('rows_skipped', 0)} skipped) in {summary['wall_s']:.1f}s")
    return check


def train_config(cfg: PipelineConfig, losses: tuple, *, cache: str | None, data: str | None,
                 betas: tuple | None = None, lr: float | None = None):
    from prefpipe.pipeline.config import train_config as build_train_config
    return build_train_config(cfg, losses, cache=cache, data=data, betas=betas, lr=lr)


def train(cfg: PipelineConfig, tc, log) -> list[dict]:
    """One `run_training` call; earlier runs of the same names are replaced unless `resume` is set."""
    from prefpipe.train.loop import run_training

    if not cfg.resume:
        for loss in tc.runs():
            old = Path(tc.out) / loss.run_name
            if old.exists():
                log(f"replacing the earlier run {old}")
                trash = old.with_name(f".{old.name}.old-{os.getpid()}")
                os.replace(old, trash)
                shutil.rmtree(trash)
    return run_training(tc)["runs"]


def gen_settings(cfg: PipelineConfig):
    from prefpipe.pipeline.config import gen_settings as build_gen_settings
    return build_gen_settings(cfg)


def run_pipeline(cfg: PipelineConfig, log=print) -> dict:
    """Caches (when needed), training runs, evaluations, pipeline.json and the report."""
    from prefpipe.evaluation.evaluate import Run, eval_generation, eval_preference, resolve_run
    from prefpipe.evaluation.report import write_report

    t0 = time.perf_counter()
    runs_dir = RunsDir(cfg.runs_dir)
    paired = tuple(lt for lt in dict.fromkeys(cfg.losses) if lt != "kto")
    kto = "kto" in cfg.losses
    paired_needs_ref = any(lt not in REFERENCE_FREE for lt in paired)
    checks = {}
    cache = cfg.path_or("cache", "cache")
    if paired_needs_ref:
        checks["paired"] = ensure_cache(cfg, cache, cfg.data, kto=False, log=log)
    elif paired:
        log(f"phase one skipped: {', '.join(paired)} need no reference log-probs; training reads {cfg.data}")
    if kto:
        checks["kto"] = ensure_cache(cfg, cfg.path_or("kto_cache", "cache-kto"), cfg.kto_data or cfg.data,
                                     kto=True, log=log)
    if cfg.eval_data:
        checks["eval"] = ensure_cache(cfg, cfg.path_or("eval_cache", "cache-eval"), cfg.eval_data, kto=False,
                                      log=log)
    t_cache = time.perf_counter() - t0

    results = []
    if paired:
        tc = train_config(cfg, paired, cache=cache if paired_needs_ref else None,
                          data=None if paired_needs_ref else cfg.data)
        results += train(cfg, tc, log)
    if kto:
        results += train(cfg, train_config(cfg, ("kto",), cache=cfg.path_or("kto_cache", "cache-kto"), data=None,
                                           betas=tuple(cfg.kto_beta or cfg.betas), lr=cfg.kto_lr), log)
    t_train = time.perf_counter() - t0 - t_cache

    evals = {}
    if cfg.eval_gen and cfg.eval_baseline:
        from prefpipe.data.fingerprint import resolve_model_dir
        ref = Run(runs_dir.reference.path, resolve_model_dir(cfg.model), "reference", None, None)
        evals["reference"] = {"gen": eval_generation(ref, cfg.eval_gen, gen_settings(cfg))}
        log(f"eval reference (the SFT model): downstream accuracy {evals['reference']['gen']['accuracy']:.3f}")
    for r in results:
        run = resolve_run(runs_dir.run(r["dir"]).path)
        e = {}
        if cfg.eval_data:
            e["pref"] = eval_preference(run, cfg.path_or("eval_cache", "cache-eval"), device=cfg.device,
                                        dtype=cfg.dtype)
            atomic_write_text(runs_dir.run(r["dir"]).eval_pref, json.dumps(e["pref"], indent=2))
        if cfg.eval_gen:
            e["gen"] = eval_generation(run, cfg.eval_gen, gen_settings(cfg))
        evals[run.name] = e
        shown = [f"held-out reward acc {e['pref']['acc']:.3f}"] if "pref" in e else []
        shown += [f"downstream accuracy {e['gen']['accuracy']:.3f}"] if "gen" in e else []
        if shown:
            log(f"eval {run.name}: {', '.join(shown)}")
    t_eval = time.perf_counter() - t0 - t_cache - t_train

    summary = {"config": cfg.config_path, "settings": cfg.values,
               "caches": {k: {"path": c.path, "action": c.action, "reason": c.reason} for k, c in checks.items()},
               "runs": results, "evals": evals,
               "timing_s": {"caches": round(t_cache, 1), "train": round(t_train, 1), "eval": round(t_eval, 1)}}
    runs_dir.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(runs_dir.pipeline, json.dumps(summary, indent=2, default=str))
    report = write_report(runs_dir.path, only=[r["dir"] for r in results])
    summary["report"] = {k: v for k, v in report.items() if k != "markdown"}
    summary["timing_s"]["total"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(runs_dir.pipeline, json.dumps(summary, indent=2, default=str))
    log(f"report: {report['summary']} ({report['headline']})")
    return summary
