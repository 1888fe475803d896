"""`prefpipe pipeline` settings: one table of keys, read from a TOML file and overridden by CLI options.

Rules a user needs to know:

- Every key is also a CLI option of the same name (``lr = 1e-6`` is ``--lr 1e-6``). An option given on the command
  line wins over the file, and the file wins over the default.
- Tables ``[precompute]``, ``[train]`` and ``[eval]`` only group keys for readability: ``[train] lr = 1e-6`` is the
  same as a top-level ``lr = 1e-6`` (a key under the wrong table is an error). In ``[eval]`` the keys drop their
  ``eval_`` prefix: ``[eval] gen = "test.jsonl"`` is ``--eval_gen test.jsonl``.
- ``loss_type`` and ``beta`` take a list or a single value; on the command line, repeat the option.
- Relative paths in the file are relative to the file's directory (``model`` only when that path exists, so that
  hub ids keep working); on the command line they are relative to the working directory.
- An unknown key, a key in two places, or a value of the wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefpipe.data.formats import DEFAULT_TURN_MARKER
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.errors import UserError
from prefpipe.precompute.backend import BackendOptions
from prefpipe.train.config import SCHEDULERS, LoopConfig, OptimConfig, SourceConfig
from prefpipe.train.losses import LOSS_TYPES

GEN_PROMPT_TEMPLATE = "Question: {question}\nAnswer: "


@dataclass(frozen=True)
class Key:
    name: str
    kind: str  # str | int | float | bool | path | str_list | float_list
    default: Any
    section: str  # "" (top level), "precompute", "train", "eval"
    help: str
    choices: tuple = ()


def _k(name, kind, default, section, help, choices=()):
    return Key(name, kind, default, section, help, tuple(choices))


KEYS: list[Key] = [
    # what to run
    _k("model", "path", None, "", "The SFT model directory (or hub id): reference and starting policy."),
    _k("data", "path", None, "", "Preference data (a file, directory or glob)."),
    _k("kto_data", "path", None, "", "Data for kto runs [default: --data, two examples per pair]."),
    _k("cache", "path", None, "", "Paired cache directory [default: RUNS_DIR/cache-<identity>]."),
    _k("kto_cache", "path", None, "", "KTO cache directory [default: RUNS_DIR/cache-kto-<identity>]."),
    _k("runs_dir", "path", "runs", "", "Where runs, evaluations, the summary and the plots go."),
    _k("loss_type", "str_list", ["dpo"], "", "Loss types to train (a list; repeat the option).", LOSS_TYPES),
    _k("beta", "float_list", [0.1], "", "Betas to sweep (a list; repeat the option)."),
    _k("kto_beta", "float_list", None, "", "Betas for kto runs [default: --beta]."),
    _k("recompute", "bool", False, "", "Recompute the caches even when they are valid."),
    _k("dtype", "str", "auto", "", "Compute dtype for every phase.", ("auto", "float32", "bfloat16", "float16")),
    _k("device", "str", "auto", "", "auto, cpu, cuda or cuda:N."),
    _k("progress", "bool", True, "", "Progress bars."),
    # phase one
    _k("backend", "str", "hf", "precompute", "Scoring engine.", ("hf", "vllm")),
    _k("max_length", "int", TokenizeSettings.max_length, "precompute", "Total token budget per sequence."),
    _k("max_prompt_length", "int", TokenizeSettings.max_prompt_length, "precompute", "Prompt token budget."),
    _k("batch_tokens", "int", BackendOptions.batch_tokens, "precompute", "hf: padded tokens per forward."),
    _k("part_rows", "int", 4096, "precompute", "Input rows per cache part."),
    _k("prompt_col", "str", "prompt", "precompute", "Column holding the prompt."),
    _k("chosen_col", "str", "chosen", "precompute", "Column holding the chosen response."),
    _k("rejected_col", "str", "rejected", "precompute", "Column holding the rejected response."),
    _k("completion_col", "str", "completion", "precompute", "Unpaired data: the completion column."),
    _k("label_col", "str", "label", "precompute", "Unpaired data: the boolean label column."),
    _k("turn_marker", "str", DEFAULT_TURN_MARKER, "precompute", "Implicit-prompt transcripts' turn marker."),
    # phase two
    _k("lr", "float", OptimConfig.lr, "train", "Peak learning rate."),
    _k("kto_lr", "float", None, "train", "Peak learning rate of kto runs [default: lr]."),
    _k("weight_decay", "float", OptimConfig.weight_decay, "train", "AdamW weight decay."),
    _k("warmup_ratio", "float", OptimConfig.warmup_ratio, "train", "Fraction of steps spent warming up."),
    _k("lr_scheduler", "str", OptimConfig.lr_scheduler, "train", "Decay after warm-up.", SCHEDULERS),
    _k("max_grad_norm", "float", OptimConfig.max_grad_norm, "train", "Gradient clipping (0: none)."),
    _k("batch_size", "int", LoopConfig.batch_size, "train", "Rows per micro-batch per process."),
    _k("grad_accum", "int", LoopConfig.grad_accum, "train", "Micro-batches per optimizer step."),
    _k("epochs", "int", LoopConfig.epochs, "train", "Passes over the cache."),
    _k("max_steps", "int", None, "train", "Optimizer steps; overrides epochs."),
    _k("seed", "int", LoopConfig.seed, "train", "Data order seed."),
    _k("eval_fraction", "float", LoopConfig.eval_fraction, "train", "Rows held out of training and evaluated."),
    _k("eval_every", "int", None, "train", "Steps between in-training evaluations."),
    _k("save_every", "int", LoopConfig.save_every, "train", "Checkpoint every N steps (0: final only)."),
    _k("resume", "bool", False, "train", "Continue interrupted runs and skip finished ones, instead of "
       "replacing every run of the sweep."),
    _k("label_smoothing", "float", 0.0, "train", "dpo: conservative DPO label smoothing."),
    _k("desirable_weight", "float", 1.0, "train", "kto: lambda_D."),
    _k("undesirable_weight", "float", 1.0, "train", "kto: lambda_U."),
    _k("orpo_lambda", "float", 1.0, "train", "orpo: weight of the odds-ratio term."),
    _k("max_drift", "float", SourceConfig.max_drift, "train", "Step-0 drift limit, nats per token."),
    _k("drift_rows", "int", SourceConfig.drift_rows, "train", "Rows scored for the step-0 drift check."),
    # evaluation
    _k("eval_data", "path", None, "eval", "Held-out preference pairs: implicit-reward accuracy and margin."),
    _k("eval_cache", "path", None, "eval", "Cache for eval_data [default: RUNS_DIR/cache-eval-<identity>]."),
    _k("eval_gen", "path", None, "eval", "Held-out GSM8K-style questions: greedy exact-match accuracy."),
    _k("eval_prompt_template", "str", GEN_PROMPT_TEMPLATE, "eval", "Prompt for a question ({question})."),
    _k("eval_chat", "bool", False, "eval", "Render the question with the tokenizer's chat template instead."),
    _k("eval_max_new_tokens", "int", 256, "eval", "Generation budget per question."),
    _k("eval_batch_size", "int", 64, "eval", "Questions per generate() call."),
    _k("eval_engine", "str", "auto", "eval", "Generation engine (auto: vLLM when installed with CUDA).",
       ("auto", "hf", "vllm")),
    _k("eval_limit", "int", None, "eval", "Evaluate only the first N questions."),
    _k("eval_baseline", "bool", True, "eval", "Also evaluate the SFT model itself (RUNS_DIR/reference)."),
]
KEY_BY_NAME = {k.name: k for k in KEYS}
PATH_KEYS = {k.name for k in KEYS if k.kind == "path"}
SECTIONS = ("precompute", "train", "eval")


@dataclass
class PipelineConfig:
    """The resolved settings: `values` holds every key of `KEYS`; `sources` says where each came from."""
    values: dict
    sources: dict = field(default_factory=dict)  # key -> "default" | "file" | "option"
    config_path: str | None = None

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def losses(self) -> tuple:
        return tuple(self.values["loss_type"])

    @property
    def betas(self) -> tuple:
        return tuple(self.values["beta"])

    def path_or(self, key: str, default_name: str) -> str:
        v = self.values[key]
        return v if v is not None else str(Path(self.values["runs_dir"]) / default_name)


# ---------------------------------------------------------------- values

def _type_error(key: str, want: str, value, file: str | None):
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return UserError(f"key '{key}' must be {want}, got {type(value).__name__} {shown}", file=file)


def coerce(key: Key, value, file: str | None = None):
    """Check a TOML value (or a parsed CLI value) against the key's type; lists accept a single value."""
    k = key.kind
    if value is None:
        return None
    if k in ("str", "path"):
        if not isinstance(value, str):
            raise _type_error(key.name, "a string", value, file)
        if key.choices and value not in key.choices:
            raise UserError(f"key '{key.name}' must be one of {', '.join(key.choices)} (got {value!r})", file=file)
        return value
    if k == "bool":
        if not isinstance(value, bool):
            raise _type_error(key.name, "true or false", value, file)
        return value
    if k == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(key.name, "an integer", value, file)
        return value
    if k == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(key.name, "a number", value, file)
        return float(value)
    if k in ("str_list", "float_list"):
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise UserError(f"key '{key.name}' must not be empty", file=file)
        scalar = Key(key.name, "str" if k == "str_list" else "float", None, key.section, "", key.choices)
        return [coerce(scalar, v, file) for v in items]
    raise AssertionError(k)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(KEY_BY_NAME) + [n[5:] for n in KEY_BY_NAME if n.startswith("eval_")],
                                      n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_toml(path: str | Path) -> dict:
    """Flatten a pipeline TOML file into {key: value}, checking names and types."""
    p = Path(path)
    if not p.is_file():
        raise UserError("no such config file", file=str(p))
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"not valid TOML ({e})", file=str(p))
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text ({e})", file=str(p))
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}

    def put(name: str, value, place: str):
        key = KEY_BY_NAME.get(name)
        if key is None:
            raise UserError(f"unknown key '{place}'{_suggest(name)}", file=str(p))
        if name in flat:
            raise UserError(f"key '{name}' is given twice ('{where[name]}' and '{place}')", file=str(p))
        flat[name] = coerce(key, value, str(p))
        where[name] = place

    for name, value in doc.items():
        if isinstance(value, dict):
            if name not in SECTIONS:
                raise UserError(f"unknown table [{name}] (tables: {', '.join(SECTIONS)})", file=str(p))
            for sub, v in value.items():
                if isinstance(v, dict):
                    raise UserError(f"unexpected nested table [{name}.{sub}]", file=str(p))
                key_name = f"eval_{sub}" if name == "eval" and not sub.startswith("eval_") else sub
                key = KEY_BY_NAME.get(key_name)
                if key is not None and key.section != name:
                    home = f"[{key.section}]" if key.section else "the top level"
                    raise UserError(f"key '{name}.{sub}' belongs in {home}", file=str(p))
                put(key_name, v, f"{name}.{sub}")
        else:
            put(name, value, name)
    base = p.resolve().parent
    for name in PATH_KEYS & flat.keys():
        v = flat[name]
        if v is not None and not Path(v).is_absolute():
            candidate = base / v
            if name != "model" or candidate.exists():
                flat[name] = str(candidate)
    return flat


def resolve(config_path: str | None, options: dict) -> PipelineConfig:
    """Defaults, then the file, then `options` (only the ones given on the command line)."""
    values = {k.name: (list(k.default) if isinstance(k.default, list) else k.default) for k in KEYS}
    sources = {k.name: "default" for k in KEYS}
    if config_path:
        for name, v in read_toml(config_path).items():
            values[name], sources[name] = v, "file"
    for name, v in options.items():
        if name not in KEY_BY_NAME:
            raise KeyError(name)
        values[name], sources[name] = coerce(KEY_BY_NAME[name], v), "option"
    cfg = PipelineConfig(values, sources, config_path)
    _check(cfg)
    return cfg


def _check(cfg: PipelineConfig):
    where = f" (set it in {cfg.config_path} or with --%s)" if cfg.config_path else " (--%s)"
    if not cfg.values["model"]:
        raise UserError("no model given" + where % "model")
    if not cfg.values["data"]:
        raise UserError("no data given" + where % "data")
    TokenizeSettings(cfg.values["max_length"], cfg.values["max_prompt_length"])
    for b in cfg.values["beta"] + (cfg.values["kto_beta"] or []):
        if b <= 0:
            raise UserError(f"every beta must be positive (got {b:g})", file=cfg.config_path)
