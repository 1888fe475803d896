"""On-policy rounds (`rounds = N` with a `[generate]` table): round r samples prompts from its starting policy
(round 1: the SFT model; round r: round r-1's trained model), judges the samples, builds pairs, precomputes their
reference log-probs, trains one run and evaluates it, all under ``RUNS_DIR/round-<r>/``.

- **Reference.** `reference_model = "initial"` keeps the SFT model as every round's reference (RLHFlow's online
  recipe); `"previous"` makes round r's starting policy its reference (Iterative RPO), so each round's step 0 is
  the usual ln 2. With "initial" the policy of round r >= 2 starts away from the reference: the cache's model is
  the SFT model and training says so (`allow_reference_mismatch`), which is what that recipe means.
- **One run per round.** Its final model starts the next round, so a sweep is refused up front.
- **Inside a round** everything is the ordinary pipeline on the round's generate output: its caches, runs and
  evaluations live in the round's directory and are reused by the usual rules.
- **Reruns.** A finished round writes ``round.json`` with a key over every setting it read and its starting
  policy's fingerprint; a rerun with the same key reuses the round whole (no sampling, no training), and one with
  another key redoes that round and every later one. An unfinished round resumes: generation from its parts,
  training from its checkpoints.
- **Outputs.** ``RUNS_DIR/rounds.json`` (each round's policy, pairs and held-out metrics), ``rounds.png`` (the
  held-out metric per round, round 0 being the SFT model) and ``rounds.md``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

from prefpipe.data.fingerprint import model_fingerprint
from prefpipe.errors import UserError
from prefpipe.fileio import atomic_write_text, atomic_write_with
from prefpipe.generation.run import run_generate
from prefpipe.pipeline.config import PipelineConfig, for_round
from prefpipe.rundir import RunDir

ROUND_RECORD = "round.json"
ROUND_STARTED = "round.started"  # the key of the settings the round's samples were begun with
# Keys that change neither what a round samples nor what it trains.
_NOT_IN_KEY = {"progress", "runs_dir", "recompute"}


def round_dir(cfg: PipelineConfig, r: int) -> Path:
    return Path(cfg.settings.runs_dir) / f"round-{r}"


def _round_key(cfg: PipelineConfig, r: int, policy: str) -> str:
    settings = {k: v for k, v in cfg.recorded.items() if k not in _NOT_IN_KEY}
    blob = json.dumps({"round": r, "policy": model_fingerprint(policy), "settings": settings}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def round_config(cfg: PipelineConfig, r: int, policy: str) -> PipelineConfig:
    """The ordinary pipeline of round r: its generate output as data, its directory as runs_dir."""
    rd = round_dir(cfg, r)
    reference = cfg.settings.model if cfg.settings.reference_model == "initial" else policy
    return for_round(cfg, reference=reference, policy=policy, data=str(rd / "samples"), runs_dir=str(rd),
                     baseline=cfg.held_out.baseline and r == 1)


def _finished(rd: Path, key: str) -> dict | None:
    try:
        rec = json.loads((rd / ROUND_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if rec.get("key") == key and Path(rec.get("final_model", "")).is_dir() else None


def _metric(evals: dict, name: str) -> dict:
    e = evals.get(name) or {}
    out = {}
    if "gen" in e:
        out["accuracy"] = e["gen"]["accuracy"]
    if "pref" in e:
        out["reward_acc"] = e["pref"]["acc"]
    return out


def run_one_round(cfg: PipelineConfig, r: int, policy: str, log, run_pipeline_in) -> dict:
    rd = round_dir(cfg, r)
    key = _round_key(cfg, r, policy)
    done = _finished(rd, key)
    if done is not None:
        log(f"round {r}: reusing the finished round ({rd / ROUND_RECORD})")
        return done
    t0 = time.perf_counter()
    rd.mkdir(parents=True, exist_ok=True)
    # A round finished, or begun, under other settings (or from another policy) is redone from scratch: its samples
    # are the pipeline's own, and stale. An unfinished one under these settings resumes from its sample parts.
    started = rd / ROUND_STARTED
    redo = (rd / ROUND_RECORD).exists() or (started.exists() and started.read_text().strip() != key)
    atomic_write_text(started, key + "\n")
    log(f"round {r}: {'redoing (its settings or policy changed), ' if redo else ''}generating from {policy}")
    gen = run_generate(replace(cfg.generate, model=policy, out=str(rd / "samples"), overwrite=redo))
    log(f"round {r}: {gen['samples']} samples, mean reward {gen['mean_reward']:.3f}, {gen['pairs']} pairs "
        f"({', '.join(f'{k} {v}' for k, v in gen['prompt_outcomes'].items())})")
    if gen["pairs"] == 0:
        raise UserError(f"round {r} built no pairs from its samples ({gen['prompt_outcomes']}); more samples "
                        "per prompt, another temperature or another judge can give some", file=str(rd / "samples"))
    sub = round_config(cfg, r, policy)
    summary = run_pipeline_in(sub, log)
    run = summary["runs"][0]
    final = RunDir(rd / run["dir"]).final
    rec = {"key": key, "round": r, "policy": policy, "reference": sub.settings.model, "final_model": str(final),
           "generate": gen, "run": run["dir"], "eval": _metric(summary["evals"], Path(run["dir"]).name),
           "reference_eval": _metric(summary["evals"], "reference"), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(rd / ROUND_RECORD, json.dumps(rec, indent=2, default=str))
    return rec


def run_rounds(cfg: PipelineConfig, log, run_pipeline_in) -> dict:
    """Every round in turn (module docstring); `run_pipeline_in(cfg, log)` runs one round's ordinary pipeline."""
    policy, records = cfg.settings.model, []
    for r in range(1, cfg.settings.rounds + 1):
        rec = run_one_round(cfg, r, policy, log, run_pipeline_in)
        records.append(rec)
        policy = rec["final_model"]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in rec["eval"].items()) or "no held-out evaluation set"
        log(f"round {r}: {shown}")
    summary = {"rounds": records, "initial": records[0].get("reference_eval", {}) if records else {},
               "final_model": policy}
    atomic_write_text(Path(cfg.settings.runs_dir) / "rounds.json", json.dumps(summary, indent=2, default=str))
    write_rounds_report(Path(cfg.settings.runs_dir), summary)
    return summary


def write_rounds_report(runs_dir: Path, summary: dict):
    """rounds.md (a table) and rounds.png (each held-out metric per round; round 0 is the SFT model)."""
    metrics = sorted({k for rec in summary["rounds"] for k in rec["eval"]} | set(summary["initial"]))
    rows = [("0 (SFT model)", summary["initial"], "", "")]
    rows += [(str(rec["round"]), rec["eval"], rec["generate"]["pairs"], f"{rec['generate']['mean_reward']:.3f}")
             for rec in summary["rounds"]]
    lines = ["| " + " | ".join(["round", *metrics, "pairs", "mean sample reward"]) + " |",
             "|" + "---|" * (len(metrics) + 3)]
    for name, m, pairs, reward in rows:
        cells = [name, *(f"{m[k]:.3f}" if k in m else "" for k in metrics), str(pairs), reward]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(runs_dir / "rounds.md", "\n".join(lines) + "\n")
    if not metrics:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k in metrics:
        pts = [(i, m[k]) for i, (_, m, _, _) in enumerate(rows) if k in m]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
    ax.set_xlabel("round (0: SFT model)")
    ax.set_ylabel("held-out")
    ax.set_xticks(range(len(rows)))
    ax.legend()
    fig.tight_layout()
    atomic_write_with(runs_dir / "rounds.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
