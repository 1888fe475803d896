"""`run_pipeline(cfg)`: phase one when needed, every (loss type, beta) run, evaluation, summary and plots.

Decisions a user needs to know:

- **Cache reuse.** A cache is reused when its identity (`prefpipe.data.identity`: fingerprints of the model
  (config and weights), the tokenizer, the tokenization settings and the data (bytes and column mapping), the turn
  marker, the kind, reference log-probs) matches this run. Backend, dtype and batch size are not part of it: they
  change numerics, not meaning. An unfinished cache resumes when, in addition, backend, dtype, part_rows and the
  prefpipe version match; otherwise it is recomputed. The log says which happened and what differed.
- **Cache directories.** The pipeline's own caches are `RUNS_DIR/cache-<id>`, `cache-kto-<id>` and
  `cache-eval-<id>`, `<id>` 12 hex digits of the cache's identity: a changed setting builds a new cache beside the
  old one instead of replacing it. A cache you name (`cache`, `kto_cache`, `eval_cache`) is never replaced
  without `--recompute`: a mismatch stops the pipeline, before any compute, with the differences.
- **Checks first.** Data kinds (losses other than kto need pairs; so does eval_data) and every cache are checked
  before any cache is computed.
- **Which caches.** Paired losses that need a reference (dpo, ipo, hinge) share one paired cache; reference-free
  losses (orpo, sft) train from it too when it exists, and from the data directly when no loss needs it (an
  ORPO-only pipeline runs no phase one). kto has its own cache of single examples with pinned partners, made
  from `kto_data` (or from `data`, two examples per pair). `eval_data` gets a third cache for held-out metrics;
  `eval_cache` alone (no `eval_data`) is evaluated as it is, once its model and tokenizer fingerprints are those
  of `model`.
- **Reruns** keep every finished run whose settings match, continue an unfinished one from its last checkpoint
  and replace only the runs whose settings changed (`prefpipe.pipeline.reruns`); other runs in RUNS_DIR are left
  alone.
- **Outputs** (layout in prefpipe.rundir). RUNS_DIR holds the runs (`<loss>-beta<beta>/`, or `orpo/`, `sft/`),
  `summary.json` (every trained run, as `prefpipe train` writes it), `pipeline.json` (this pipeline's caches,
  settings, runs, evaluations and timings), `reference/eval_gen.json` for the SFT model, and the report's plots
  and `summary.md`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from prefpipe.data import identity
from prefpipe.data.cache import MANIFEST, read_manifest
from prefpipe.errors import UserError
from prefpipe.evaluation.evaluate import Run, eval_generation, eval_preference, resolve_run
from prefpipe.evaluation.report import write_report
from prefpipe.fileio import OutputLock, atomic_write_text, check_writable
from prefpipe.model_paths import resolve_model_dir
from prefpipe.pipeline.config import PipelineConfig, from_cache
from prefpipe.pipeline.reruns import check_run, prepare, record
from prefpipe.pipeline.rounds import run_rounds
from prefpipe.pipeline.sweep import needs_reference, split_losses
from prefpipe.precompute import plan
from prefpipe.precompute.run import run_precompute
from prefpipe.rundir import RunsDir
from prefpipe.train.loop import run_training


@dataclass
class CacheCheck:
    path: str
    action: str  # "reuse" | "compute" | "recompute" | "resume"
    reason: str
    identity_key: str = ""  # the digest of the identity it serves (prefpipe.data.identity.key of reuse(...))

    def line(self) -> str:
        verb = {"reuse": "reusing", "compute": "computing", "recompute": "recomputing",
                "resume": "resuming"}[self.action]
        return f"cache {self.path}: {verb} ({self.reason})"


def model_fingerprints(model: str) -> dict:
    """The model's weights fingerprint and its tokenizer's, computed once per pipeline and handed to each plan."""
    return plan.fingerprints(model)


def _plan(cfg: PipelineConfig, data: str, *, kto: bool, fingerprints: dict, out=None):
    """Phase one's plan (`prefpipe.precompute.plan`) for a cache of `data` made by this run; `out`: None (only
    the identity is wanted), or the cache directory as a function of the identity's key."""
    pc = replace(cfg.precompute, data=data, kto=kto)
    if out is None:
        return plan.expected(pc, pc.input.dataset(data, kto_view=pc.kto), fingerprints)[1]
    return plan.plan(pc, pc.input.dataset(data, kto_view=pc.kto), fingerprints, out=out)


def expected_identity(model: str, data: str, cfg: PipelineConfig, *, kto: bool,
                      fingerprints: dict | None = None) -> dict:
    """The identity (`prefpipe.data.identity`) a cache of `data` made by this run would carry."""
    return _plan(cfg, data, kto=kto, fingerprints=fingerprints or model_fingerprints(model))


def check_cache(path: str, expected: dict, *, recompute: bool) -> CacheCheck:
    """Decide whether the cache at `path` can serve a run of identity `expected`, and say why (the plan's
    decision, `prefpipe.precompute.plan.decide`)."""
    if recompute:
        return CacheCheck(path, "recompute", "--recompute was given", identity.key(identity.reuse(expected)))
    action, reason, _ = plan.decide(path, expected, overwrite=False)
    return CacheCheck(path, action, reason, identity.key(identity.reuse(expected)))


def plan_cache(cfg: PipelineConfig, runs_dir: RunsDir, role: str, data: str, *, kto: bool,
               fingerprints: dict) -> CacheCheck:
    """Where the `role` cache lives and what to do with it; raises before any compute when a cache the user named
    would have to be replaced without --recompute."""
    setting, named = {"paired": ("cache", cfg.settings.cache), "kto": ("kto_cache", cfg.settings.kto_cache),
                      "eval": ("eval_cache", cfg.held_out.cache)}[role]
    p = _plan(cfg, data, kto=kto, fingerprints=fingerprints,
              out=lambda key: named if named is not None else runs_dir.cache(role, key))
    check = CacheCheck(p.out, "recompute", "--recompute was given", p.key) if cfg.settings.recompute else \
        CacheCheck(p.out, p.action, p.reason, p.key)
    if named is not None and check.action == "recompute" and not cfg.settings.recompute:
        raise UserError(f"this cache does not match the run ({check.reason}) and is not replaced without "
                        f"--recompute: pass --recompute to rebuild it, or set {setting} to another path",
                        file=check.path)
    return check


def ensure_cache(cfg: PipelineConfig, check: CacheCheck, data: str, *, kto: bool, log) -> CacheCheck:
    """Phase one for one cache, only when `check` (from `plan_cache`) says so."""
    path = check.path
    log(check.line())
    if check.action == "reuse":
        return check
    pc = replace(cfg.precompute, out=path, data=data, kto=kto, overwrite=check.action == "recompute")
    summary = run_precompute(pc)
    counts = summary.get("counts") or {}
    log(f"cache {path}: wrote {counts.get('rows_written', '?')} rows "
        f"({counts.get('rows_skipped', 0)} skipped) in {summary['wall_s']:.1f}s")
    return check


def given_eval_cache(cfg: PipelineConfig, fingerprints: dict) -> CacheCheck:
    """`eval_cache` without `eval_data`: used as it is (there is no data to build it from), when it is a finished
    paired cache with reference log-probs of `model` through its tokenizer; refused before any compute otherwise."""
    path = cfg.held_out.cache
    if not (Path(path) / MANIFEST).exists():
        raise UserError("eval_cache without eval_data must be a finished cache (no manifest.json here); set "
                        "eval_data to build it", file=path)
    found = identity.identity_of(read_manifest(Path(path))["metadata"])
    expected = {**found, "model": fingerprints["model"], "tokenizer": fingerprints["tokenizer"]["fingerprint"],
                "kind": "paired",
                "has_reference": True}
    diff = identity.differences(expected, found)
    if diff:
        raise UserError(f"eval_cache cannot measure this pipeline's runs ({'; '.join(diff)}); point it at a "
                        "paired cache made from model, or set eval_data to build one", file=path)
    return CacheCheck(path, "reuse", "eval_cache as given: its model and tokenizer fingerprints match",
                      identity.key(identity.reuse(found)))


def train(tc, check: CacheCheck, log) -> list[dict]:
    """One `run_training` call for the runs of `tc` that need it (`prefpipe.pipeline.reruns`); the results of
    all of them, in order. `check`: the cache the runs train from (or the data's identity), which a run found
    from an earlier call must have been trained on: not one this pipeline has just computed."""
    runs_dir = RunsDir(tc.out)
    records = [record(tc.resolved(loss), check.identity_key) for loss in tc.runs()]
    rebuilt = check.action != "reuse"
    checks = [check_run(runs_dir.run(loss.run_name), rec, rebuilt=rebuilt) for loss, rec in zip(tc.runs(), records)]
    prepare(checks, records, log)
    if all(c.action == "keep" for c in checks):
        return [json.loads(c.run.result.read_text()) for c in checks]
    return run_training(tc)["runs"]  # tc has resume set: kept runs are skipped, continued ones resume


def check_data_kinds(cfg: PipelineConfig, paired: tuple):
    """Stop before any compute when a data file has bad rows (every row is checked) or cannot serve what is asked
    of it."""
    def is_paired(data: str) -> bool:
        return cfg.precompute.input.dataset(data).validate().paired
    if paired and not is_paired(cfg.settings.data):
        raise UserError(f"{', '.join(paired)} train{'s' if len(paired) == 1 else ''} on pairs (prompt, chosen, "
                        "rejected), but data holds unpaired examples (prompt, completion, label); use loss_type "
                        "kto for unpaired data, or point data at pairs", file=cfg.settings.data)
    if cfg.held_out.data and not is_paired(cfg.held_out.data):
        raise UserError("eval_data must hold pairs (prompt, chosen, rejected) for held-out reward accuracy; this "
                        "file holds unpaired examples", file=cfg.held_out.data)


def run_pipeline(cfg: PipelineConfig, log=print) -> dict:
    """Caches (when needed), training runs, evaluations, pipeline.json and the report.

    RUNS_DIR is checked (creatable, writable) before any model is loaded and locked for the whole pipeline, so a
    second pipeline or train into it is refused; the train calls made here take the same lock again (a no-op)."""
    runs_dir = cfg.settings.runs_dir
    check_writable(runs_dir, "runs_dir")
    if cfg.settings.rounds is not None:
        with OutputLock(runs_dir, "runs_dir"):
            return run_rounds(cfg, log, _run_pipeline)
    # Reads data and eval_data once, every row: a refusal comes before runs_dir holds anything.
    check_data_kinds(cfg, split_losses(cfg.losses)[0])
    with OutputLock(runs_dir, "runs_dir"):
        return _run_pipeline(cfg, log)


def _run_pipeline(cfg: PipelineConfig, log) -> dict:
    t0 = time.perf_counter()
    runs_dir = RunsDir(cfg.settings.runs_dir)
    checks = _caches(cfg, runs_dir, log)
    t_cache = time.perf_counter() - t0
    results = _train_runs(cfg, checks, log)
    t_train = time.perf_counter() - t0 - t_cache
    evals = _evaluate(cfg, runs_dir, results, checks.get("eval"), log)
    t_eval = time.perf_counter() - t0 - t_cache - t_train

    summary = {"config": cfg.config_path, "settings": cfg.recorded,
               "caches": {k: {"path": c.path, "action": c.action, "reason": c.reason} for k, c in checks.items()
                          if k in ("paired", "kto", "eval")},
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


def _caches(cfg: PipelineConfig, runs_dir: RunsDir, log) -> dict[str, CacheCheck]:
    """Every cache the pipeline uses, by role, computed where needed; "data": the identity of `data` when paired
    runs train from it directly (no paired cache), which their records name instead of a cache."""
    s, held_out = cfg.settings, cfg.held_out
    paired, unpaired = split_losses(cfg.losses)
    paired_needs_ref = needs_reference(paired)
    fingerprints = model_fingerprints(s.model)  # the weights are hashed once per process (see fingerprint.py)
    wanted = ([("paired", s.data, False)] if paired_needs_ref else []) + \
        ([("kto", s.kto_data or s.data, True)] if unpaired else []) + \
        ([("eval", held_out.data, False)] if held_out.data else [])
    # Every cache is checked before any is computed, so a refusal costs no compute.
    planned = {role: plan_cache(cfg, runs_dir, role, data, kto=k, fingerprints=fingerprints)
               for role, data, k in wanted}
    if held_out.cache and not held_out.data:
        planned["eval"] = given_eval_cache(cfg, fingerprints)
        log(planned["eval"].line())
    checks = {role: ensure_cache(cfg, planned[role], data, kto=k, log=log) for role, data, k in wanted}
    if held_out.cache and not held_out.data:
        checks["eval"] = planned["eval"]
    if paired and not paired_needs_ref:
        log(f"phase one skipped: {', '.join(paired)} need no reference log-probs; training reads {s.data}")
        digest = identity.key(identity.reuse(expected_identity(s.model, s.data, cfg, kto=False,
                                                               fingerprints=fingerprints)))
        checks["data"] = CacheCheck(s.data, "reuse", "training reads the data", digest)
    return checks


def _train_runs(cfg: PipelineConfig, checks: dict[str, CacheCheck], log) -> list[dict]:
    """Every run of the sweep: paired losses from the paired cache (or the data), then those on single examples
    from the KTO cache."""
    results = []
    if cfg.train is not None:  # from the paired cache, or (no loss reads reference log-probs) from the data
        source = checks["paired"] if "paired" in checks else checks["data"]
        results += train(from_cache(cfg.train, source.path) if "paired" in checks else cfg.train, source, log)
    if cfg.kto_train is not None:
        results += train(from_cache(cfg.kto_train, checks["kto"].path), checks["kto"], log)
    return results


def _evaluate(cfg: PipelineConfig, runs_dir: RunsDir, results: list[dict], eval_cache: CacheCheck | None,
              log) -> dict:
    """The SFT model's downstream accuracy (eval_gen), then each run's held-out reward accuracy (eval_data or
    eval_cache) and downstream accuracy."""
    evals, gen = {}, cfg.held_out.gen
    if gen and cfg.held_out.baseline:
        ref = Run(runs_dir.reference.path, resolve_model_dir(cfg.settings.model), "reference", None, None)
        evals["reference"] = {"gen": eval_generation(ref, gen, cfg.eval)}
        log(f"eval reference (the SFT model): downstream accuracy {evals['reference']['gen']['accuracy']:.3f}")
    for r in results:
        run = resolve_run(runs_dir.run(r["dir"]).path)
        e = {}
        if eval_cache is not None:
            e["pref"] = eval_preference(run, eval_cache.path, batch_size=cfg.eval.batch_size, device=cfg.eval.device,
                                        dtype=cfg.eval.dtype)
            atomic_write_text(runs_dir.run(r["dir"]).eval_pref, json.dumps(e["pref"], indent=2))
        if gen:
            e["gen"] = eval_generation(run, gen, cfg.eval)
        evals[run.name] = e
        shown = [f"held-out reward acc {e['pref']['acc']:.3f}"] if "pref" in e else []
        shown += [f"downstream accuracy {e['gen']['accuracy']:.3f}"] if "gen" in e else []
        if shown:
            log(f"eval {run.name}: {', '.join(shown)}")
    return evals
