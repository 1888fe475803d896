"""The layout of a RUNS_DIR: the one place that names its files. Training, evaluation, the pipeline, the report
and the tests all go through it.

    RUNS_DIR/
      summary.json              every run that `prefpipe train` finished here (merged across train calls, so a
                                second sweep into the same RUNS_DIR adds its runs instead of replacing the file),
                                each with the model, cache and data it trained from; "caches" lists them all
      pipeline.json             `prefpipe pipeline` only: caches used, settings, evaluations, timings
      reference/eval_gen.json   the SFT model's own downstream accuracy (pipeline with eval_gen)
      cache-<id>/ cache-kto-<id>/ cache-eval-<id>/   `prefpipe pipeline`'s own caches (paired, KTO, eval_data),
                                <id> the first 12 hex digits of the cache's identity (prefpipe.data.identity),
                                so a changed setting builds a new cache beside the old one
      curves.png beta.png summary.md      `prefpipe report`
      <run>/                    one run: `<loss>-beta<beta>`, or `<loss>` for a loss without beta
        metrics.jsonl           one JSON object per train step and per evaluation
        train_config.json       the resolved configuration of the run
        checkpoints/step-000040/    model, tokenizer, train_config.json, trainer_state.pt
        final/                  the trained model with its tokenizer and train_config.json (a LoRA run: the
                                adapter in PEFT format, loadable with PeftModel.from_pretrained(base, final))
        final-merged/           a LoRA run with --merge: the adapter merged into a plain Hugging Face model
        result.json             the run's final metrics (its entry in summary.json)
        pipeline_run.json       `prefpipe pipeline` only: the settings and data identity the run trains with,
                                compared on a rerun to keep, continue or replace it (prefpipe.pipeline.reruns)
        eval_pref.json eval_gen.json eval_gen.jsonl     `prefpipe eval` / the pipeline's evaluations
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefpipe.fileio import OutputLock, atomic_write_text

SUMMARY = "summary.json"
PIPELINE = "pipeline.json"
REFERENCE = "reference"
REPORT_FILES = {"curves": "curves.png", "beta": "beta.png", "summary": "summary.md"}

METRICS = "metrics.jsonl"
CONFIG = "train_config.json"
RESULT = "result.json"
PIPELINE_RUN = "pipeline_run.json"
FINAL = "final"
FINAL_MERGED = "final-merged"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
EVAL_PREF = "eval_pref.json"
EVAL_GEN = "eval_gen.json"
EVAL_GEN_ROWS = "eval_gen.jsonl"
CACHE_PREFIXES = {"paired": "cache", "kto": "cache-kto", "eval": "cache-eval"}


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class RunDir:
    """One run's directory (or any directory that evaluation results are written to)."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def result(self) -> Path:
        return self.path / RESULT

    @property
    def pipeline_record(self) -> Path:
        return self.path / PIPELINE_RUN

    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def final_merged(self) -> Path:
        return self.path / FINAL_MERGED

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    @property
    def eval_pref(self) -> Path:
        return self.path / EVAL_PREF

    @property
    def eval_gen(self) -> Path:
        return self.path / EVAL_GEN

    @property
    def eval_gen_rows(self) -> Path:
        return self.path / EVAL_GEN_ROWS


@dataclass(frozen=True)
class RunsDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / name)

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def pipeline(self) -> Path:
        return self.path / PIPELINE

    @property
    def reference(self) -> RunDir:
        return RunDir(self.path / REFERENCE)

    def cache(self, role: str, identity_key: str) -> Path:
        """The pipeline's own cache for `role` ("paired", "kto" or "eval") with the identity digest `identity_key`."""
        return self.path / f"{CACHE_PREFIXES[role]}-{identity_key[:12]}"

    def report_file(self, kind: str) -> Path:
        return self.path / REPORT_FILES[kind]

    def runs(self) -> list[RunDir]:
        """Run directories (those with a result.json), sorted by name."""
        if not self.path.is_dir():
            return []
        return [RunDir(p) for p in sorted(self.path.iterdir()) if (p / RESULT).exists()]


def merge_summary(runs_dir: RunsDir, summary: dict):
    """Write `summary` to RUNS_DIR/summary.json, keeping the runs an earlier train call recorded there.

    A run of the same name is replaced (it was retrained); the others stay first, in their old order, and this
    call's runs follow. Each run names its own sources ("source"); the file's only other key, "caches", lists
    every cache those runs trained from, in order, so a file written by two train calls (the pipeline's pairs,
    then its KTO examples) names both. `summary`'s other keys describe one call and are not written.

    The read and the write happen under RUNS_DIR's output lock (`prefpipe train` holds it for its whole call;
    taking it again in the same process is a no-op), so no other prefpipe command's runs are lost between them."""
    import json

    with OutputLock(runs_dir.path, "RUNS_DIR"):
        kept = []
        try:
            old = json.loads(runs_dir.summary.read_text())
            names = {r["name"] for r in summary["runs"]}
            kept = [r for r in old.get("runs", []) if isinstance(r, dict) and r.get("name") not in names]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            pass  # no summary yet, or not one of ours: start afresh
        runs = kept + summary["runs"]
        caches = list(dict.fromkeys(r["source"]["cache"] for r in runs
                                    if isinstance(r.get("source"), dict) and r["source"].get("cache")))
        atomic_write_text(runs_dir.summary, json.dumps({"caches": caches, "runs": runs}, indent=2))
