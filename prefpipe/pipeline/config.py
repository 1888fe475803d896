"""`prefpipe pipeline` settings: one table of keys, read from a TOML file and overridden by CLI options.

Rules a user needs to know:

- Every key is also a CLI option of the same name (``lr = 1e-6`` is ``--lr 1e-6``). An option given on the command
  line wins over the file, and the file wins over the default.
- Every option of ``prefpipe precompute`` and ``prefpipe train`` is a key, in ``[precompute]`` and ``[train]``
  (the keys are generated from PrecomputeConfig and TrainConfig), except those the pipeline sets itself per phase:
  ``out``, ``kto``, ``no_reference``, ``overwrite`` and ``resume`` (a rerun keeps or continues every run whose
  settings match: prefpipe.pipeline.reruns). ``model``, ``data``, ``cache``, ``loss_type``, ``beta``,
  ``dtype``, ``device`` and ``progress`` are top-level keys and apply to every phase; the tokenization and column
  keys (``max_length``, ``prompt_col``, ...) live in ``[precompute]`` and apply to training too. ``[eval]`` holds
  the options of ``prefpipe eval --gen`` plus ``data``, ``cache``, ``gen`` and ``baseline``.
- ``rounds = N`` with a ``[generate]`` table (prefpipe generate's options; full names ``generate_<option>``) runs
  on-policy rounds (prefpipe.pipeline.rounds); ``reference_model`` picks each round's reference.
- Tables ``[precompute]``, ``[train]``, ``[eval]`` and ``[generate]`` only group keys for readability: ``[train] lr = 1e-6`` is the
  same as a top-level ``lr = 1e-6`` (a key under the wrong table is an error). In ``[eval]`` the keys drop their
  ``eval_`` prefix: ``[eval] gen = "test.jsonl"`` is ``--eval_gen test.jsonl``.
- ``loss_type`` and ``beta`` take a list or a single value; on the command line, repeat the option.
- Relative paths in the file are relative to the file's directory (``model``, and data given as ``ORG/NAME``, only
  when that path exists, so that hub ids keep working); on the command line they are relative to the working
  directory.
- A key you set that has no effect in this combination (``kto_lr`` without a kto loss, ``[eval] prompt_template``
  without ``gen``, a precompute key when no phase one runs, a loss knob no loss here reads, ...) is an error naming
  the key and the file (the rule and its table: prefpipe.pipeline.effects; loss knobs: the loss registry's
  `unread_knobs`). ``[eval] cache`` alone is evaluated as it is.
- An unknown key, a key in two places, a key under the wrong table, or a value of the wrong type is an error naming
  the file and the key (with the closest known key as a suggestion). A value the settings reject (``lr = 0``) is an
  error naming the key and the file, or the option when it was given on the command line.
"""

from __future__ import annotations

import contextlib
import difflib
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from prefpipe.data.formats import Columns
from prefpipe.data.sources import is_hub_id
from prefpipe.errors import UserError
from prefpipe.evaluation.settings import GenSettings
from prefpipe.generation.config import GenerateConfig
from prefpipe.options import Option, OptionError, build, canonical_choice, cli_style, opt, options, same_as, toml_style
from prefpipe.pipeline.effects import no_effect
from prefpipe.pipeline.sweep import split_losses
from prefpipe.precompute.config import PrecomputeConfig
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.train.config import TrainConfig
from prefpipe.train.registry import KNOBS, entry_for, resolve_loss_type, unread_knobs


@dataclass(frozen=True)
class PipelineSettings:
    """The top-level keys: what to run, where, and the settings every phase shares."""
    model: str | None = opt(None, path=True, help="The SFT model directory (or hub id): reference and starting "
                            "policy.")
    data: str | None = opt(None, path=True, help="Preference data (a file, directory or glob).")
    kto_data: str | None = opt(None, path=True, help="Data for kto runs [default: --data, two examples per pair].")
    cache: str | None = opt(None, path=True, help="Paired cache directory [default: RUNS_DIR/cache-<identity>].")
    kto_cache: str | None = opt(None, path=True, help="KTO cache directory [default: RUNS_DIR/cache-kto-<identity>].")
    runs_dir: str = opt("runs", path=True, help="Where runs, evaluations, the summary and the plots go.")
    loss_type: tuple[str, ...] = same_as(TrainConfig, "loss_types", help="Loss types to train (a list; repeat the "
                                         "option).")
    beta: tuple[float, ...] = same_as(TrainConfig, "betas", help="Betas to sweep (a list; repeat the option).")
    kto_beta: tuple[float, ...] | None = opt(None, help="Betas for kto runs [default: --beta].")
    recompute: bool = opt(False, help="Recompute the caches even when they are valid.")
    dtype: str = same_as(TrainConfig, "dtype", help="Compute dtype for every phase.")
    device: str = same_as(TrainConfig, "device")
    progress: bool = same_as(TrainConfig, "progress", help="Progress bars.")
    chat_date: str = same_as(TokenizeSettings, "chat_date")
    rounds: int | None = opt(None, metavar="N", help="On-policy rounds: data holds prompts, and each round "
                             "generates from the current policy ([generate] keys), judges, builds pairs, "
                             "precomputes, trains and evaluates (RUNS_DIR/round-<r>/).",
                             default_text="unset: data holds pairs, no generation")
    reference_model: str = opt("initial", choices=("initial", "previous"), help="rounds: the reference of round r "
                               "is the SFT model (initial, as RLHFlow does) or round r's starting policy "
                               "(previous, as Iterative RPO does).")


@dataclass(frozen=True)
class PipelineTrain:
    """`[train]` keys of the pipeline only."""
    kto_lr: float | None = opt(None, help="Peak learning rate of kto runs [default: lr].")


@dataclass(frozen=True)
class PipelineEval:
    """`[eval]` keys of the pipeline only (besides GenSettings'); their full names start with `eval_`."""
    data: str | None = opt(None, path=True, help="Held-out preference pairs: implicit-reward accuracy and margin.")
    cache: str | None = opt(None, path=True, help="Cache for eval_data [default: RUNS_DIR/cache-eval-<identity>].")
    gen: str | None = opt(None, path=True, help="Held-out GSM8K-style questions: greedy exact-match accuracy.")
    baseline: bool = opt(True, help="Also evaluate the SFT model itself (RUNS_DIR/reference).")


@dataclass(frozen=True)
class Key:
    """One pipeline key: its full name (the CLI option; `[eval]` keys start with `eval_`), its table, its option."""
    name: str
    section: str  # "" (top level), "precompute", "train", "eval"
    option: Option

    @property
    def default(self):
        d = self.option.default
        return None if d is MISSING else (list(d) if isinstance(d, tuple) else d)


# Set by the pipeline for each phase and cache, so not keys (`resume`: a rerun always keeps or continues the runs
# whose settings match, see prefpipe.pipeline.reruns).
FIXED = {"out", "kto", "no_reference", "overwrite", "resume"}
_TOP = options(PipelineSettings)
_PRECOMPUTE = options(PrecomputeConfig, skip={o.name for o in _TOP} | FIXED)
_TRAIN = options(TrainConfig, skip={o.name for o in _TOP + _PRECOMPUTE} | FIXED) + options(PipelineTrain)
GEN_OPTIONS = options(GenSettings, skip={"device", "dtype", "chat_date"})  # the top-level keys
# `prefpipe generate`'s own, sampling and judge options; the input keys are [precompute]'s, the rest top-level.
GENERATE_OPTIONS = options(GenerateConfig, skip={"model", "data", "out", "dtype", "device", "progress", "overwrite"}
                           | {o.name for o in options(PrecomputeConfig)} - {"backend", "part_rows", "engine",
                                                                          "ray_workers", "ray_address",
                                                                          "gpu_memory_utilization"})
KEYS: list[Key] = ([Key(o.name, "", o) for o in _TOP] + [Key(o.name, "precompute", o) for o in _PRECOMPUTE]
                   + [Key(o.name, "train", o) for o in _TRAIN]
                   + [Key("eval_" + o.name, "eval", o) for o in options(PipelineEval) + GEN_OPTIONS]
                   + [Key("generate_" + o.name, "generate", o) for o in GENERATE_OPTIONS])
KEY_BY_NAME = {k.name: k for k in KEYS}
PATH_KEYS = {k.name for k in KEYS if k.option.path}
SECTIONS = ("precompute", "train", "eval", "generate")
PREFIXED = {"eval": "eval_", "generate": "generate_"}  # tables whose keys drop this prefix
assert len(KEY_BY_NAME) == len(KEYS), "two pipeline keys with one name"


@dataclass(frozen=True)
class PipelineConfig:
    """The resolved settings: `values` holds every key of `KEYS`; `sources` says where each came from. Nothing
    edits them once `resolve` has made them: what a phase needs beyond them is derived (`per_token`) or passed
    to the function that builds that phase's settings."""
    values: dict
    sources: dict = field(default_factory=dict)  # key -> "default" | "file" | "option"
    config_path: str | None = None
    policy: str | None = None  # a round's starting policy, when it is not `model` (prefpipe.pipeline.rounds)

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def losses(self) -> tuple:
        """The loss types by their canonical names (`DPO`, `sigmoid` -> `dpo`); a name no loss has stays as
        written, for the train settings to refuse with the key named."""

        def canonical(text):
            try:
                return resolve_loss_type(text)
            except ValueError:
                return text
        return tuple(canonical(t) for t in self.values["loss_type"])

    @property
    def per_token(self) -> bool:
        """Caches keep per-token reference log-probs: asked for, or needed by a run's loss entry (LD-DPO: dpo
        with ld_alpha)."""
        return bool(self.values["per_token"]) or any(entry_for(lt, self.values).needs_per_token_reference
                                                     for lt in self.losses)

    @property
    def betas(self) -> tuple:
        return tuple(self.values["beta"])

    def path_or(self, key: str, default_name: str) -> str:
        v = self.values[key]
        return v if v is not None else str(Path(self.values["runs_dir"]) / default_name)


# ---------------------------------------------------------------- the phases' settings

def precompute_config(cfg: PipelineConfig, out: str, data: str, *, kto: bool, overwrite: bool) -> PrecomputeConfig:
    """Phase one's settings for one cache: the keys, plus what the pipeline decides per cache."""
    return build(PrecomputeConfig, {**cfg.values, "out": out, "data": data, "kto": kto, "overwrite": overwrite,
                                    "per_token": cfg.per_token})


def train_config(cfg: PipelineConfig, losses: tuple, *, cache: str | None, data: str | None,
                 betas: tuple | None = None, lr: float | None = None, all_knobs: bool = False) -> TrainConfig:
    """One `run_training` call's settings: the keys, with the losses, betas and source the pipeline chose. A
    pipeline's loss knobs are checked against all its losses (`all_knobs`, in `_check`); a call for some of them
    gets the others' knobs at their defaults."""
    unread = {} if all_knobs else {k: KNOBS[k].default for k in unread_knobs(losses, cfg.values)}
    values = {**cfg.values, "model": cfg.policy or cfg.model, "cache": cache, "data": data, "out": cfg.runs_dir,
              "loss_type": list(losses),
              "beta": list(betas or cfg.betas), "resume": True, **unread}
    if lr:
        values["lr"] = lr
    return build(TrainConfig, values)


def generate_config(cfg: PipelineConfig, model: str, data: str, out: str) -> GenerateConfig:
    """One round's `prefpipe generate` settings: the [generate] keys, the input keys, the top-level ones."""
    values = {o.name: cfg.values["generate_" + o.name] for o in GENERATE_OPTIONS}
    shared = {o.name: cfg.values[o.name] for o in options(GenerateConfig)
              if o.name not in values and o.name in cfg.values}
    return build(GenerateConfig, {**shared, **values, "model": model, "data": data, "out": out, "overwrite": False})


def gen_settings(cfg: PipelineConfig) -> GenSettings:
    values = {o.name: cfg.values["eval_" + o.name] for o in GEN_OPTIONS}
    return build(GenSettings, {**values, "device": cfg.device, "dtype": cfg.dtype, "chat_date": cfg.chat_date})


def columns_of(cfg: PipelineConfig) -> Columns:
    return build(Columns, cfg.values)


# ---------------------------------------------------------------- values

def _type_error(key: str, want: str, value, file: str | None):
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return UserError(f"key '{key}' must be {want}, got {type(value).__name__} {shown}", file=file)


def _coerce_one(name: str, o: Option, value, file: str | None):
    if o.kind == "str":
        if not isinstance(value, str):
            raise _type_error(name, "a string", value, file)
        if o.choices and canonical_choice(value, o.choices) is None:
            raise UserError(f"key '{name}' must be one of {', '.join(o.choices)} (got {value!r})", file=file)
        return canonical_choice(value, o.choices) if o.choices else value
    if o.kind == "bool":
        if not isinstance(value, bool):
            raise _type_error(name, "true or false", value, file)
        return value
    if o.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(name, "an integer", value, file)
        return value
    if o.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(name, "a number", value, file)
        return float(value)
    raise AssertionError(o.kind)


def coerce(key: Key, value, file: str | None = None):
    """Check a TOML value (or a parsed CLI value) against the key's type; lists accept a single value."""
    if value is None:
        return None
    if key.option.multiple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise UserError(f"key '{key.name}' must not be empty", file=file)
        return [_coerce_one(key.name, key.option, v, file) for v in items]
    return _coerce_one(key.name, key.option, value, file)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(KEY_BY_NAME) + [n[len(p):] for n in KEY_BY_NAME
                                                                 for p in PREFIXED.values() if n.startswith(p)], n=1)
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
                prefix = PREFIXED.get(name, "")
                key_name = sub if sub.startswith(prefix) else prefix + sub
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
            if candidate.exists() or not (name == "model" or (name.endswith("data") and is_hub_id(v))):
                flat[name] = str(candidate)
    return flat


def resolve(config_path: str | None, options: dict) -> PipelineConfig:
    """Defaults, then the file, then `options` (only the ones given on the command line)."""
    values = {k.name: k.default for k in KEYS}
    sources = {k.name: "default" for k in KEYS}
    if config_path:
        for name, v in read_toml(config_path).items():
            values[name], sources[name] = v, "file"
    for name, v in options.items():
        if name not in KEY_BY_NAME:
            raise KeyError(name)
        values[name], sources[name] = coerce(KEY_BY_NAME[name], v), "option"
    cfg = PipelineConfig(values, sources, config_path)
    return PipelineConfig(_check(cfg), sources, config_path)


@contextlib.contextmanager
def _as_written(cfg: PipelineConfig, prefix: str = ""):
    """Re-raise a settings dataclass's `OptionError` naming each key as the user gave it: `key 'lr'` and the file
    for a value from the file, `--lr` for one from the command line or a default."""
    try:
        yield
    except OptionError as e:
        from_file = [n for n in e.names if cfg.sources.get(prefix + n) == "file"]

        def style(n):
            return toml_style(prefix + n) if prefix + n in from_file else cli_style(prefix + n)
        raise UserError(e.render(style), file=cfg.config_path if from_file else None) from None


def _check(cfg: PipelineConfig) -> dict:
    """Build every phase's settings once now, so that a bad value stops the pipeline before any work; the values
    with the prompt budget resolved (None: max_length // 2), which the caches and pipeline.json record."""
    where = f" (set it in {cfg.config_path} or with --%s)" if cfg.config_path else " (--%s)"
    if not cfg.values["model"]:
        raise UserError("no model given" + where % "model")
    if not cfg.values["data"]:
        raise UserError("no data given" + where % "data")
    for b in cfg.values["beta"] + (cfg.values["kto_beta"] or []):
        if b <= 0:
            raise UserError(f"every beta must be positive (got {b:g})", file=cfg.config_path)
    with _as_written(cfg):
        build(PipelineSettings, cfg.values), build(PipelineTrain, cfg.values)  # options.as_given: kto_lr = nan
        # The train settings first: they check the loss names, which the precompute settings ask the registry about.
        train_config(cfg, cfg.losses, cache=cfg.path_or("cache", "cache"), data=None, all_knobs=True)
        pc = precompute_config(cfg, cfg.path_or("cache", "cache"), cfg.data, kto=False, overwrite=False)
        _, unpaired = split_losses(cfg.losses)
        if unpaired:
            train_config(cfg, unpaired, cache=cfg.path_or("kto_cache", "cache-kto"), data=None,
                         betas=tuple(cfg.kto_beta or cfg.betas), lr=cfg.kto_lr).runs()
    with _as_written(cfg, "eval_"):
        gen_settings(cfg)
    _check_rounds(cfg)
    _refuse_keys_without_effect(cfg)
    return {**cfg.values, "max_prompt_length": pc.input.max_prompt_length}


def _check_rounds(cfg: PipelineConfig):
    """Rounds: a positive count, valid [generate] keys, and one training run per round (its model starts the
    next round, so a sweep would leave the next round's policy undecided)."""
    rounds = cfg.values["rounds"]
    if rounds is None:
        return
    if rounds < 1:
        named = "key 'rounds'" if cfg.sources["rounds"] == "file" else "--rounds"
        raise UserError(f"{named} must be at least 1 (got {rounds}); leave it out when data holds pairs",
                        file=cfg.config_path if cfg.sources["rounds"] == "file" else None)
    with _as_written(cfg, "generate_"):
        generate_config(cfg, cfg.model, cfg.data, str(Path(cfg.runs_dir) / "round-1" / "samples"))
    named = [k for k in ("cache", "kto_cache", "kto_data") if cfg.values[k] is not None]
    if named:
        raise UserError(f"rounds build their own data and caches in each round's directory; leave out "
                        f"{', '.join(named)}", file=cfg.config_path)
    n_runs = len(cfg.losses) * len(cfg.betas)
    if n_runs != 1:
        raise UserError(f"rounds train one run per round, whose model starts the next round; this pipeline has "
                        f"{n_runs} (loss_type x beta); give one loss_type (a combination such as '1*dpo+1*sft' is "
                        "one) and one beta", file=cfg.config_path)


def _refuse_keys_without_effect(cfg: PipelineConfig):
    found = no_effect(cfg.values, cfg.sources, cfg.losses)
    if found is None:
        return
    name, why = found
    if cfg.sources[name] == "option":
        raise UserError(f"{cli_style(name)} has no effect here: {why}; leave it out")
    key = KEY_BY_NAME[name]
    prefix = PREFIXED.get(key.section)
    written = f"{key.section}.{name[len(prefix):]}" if prefix else name
    raise UserError(f"key '{written}' has no effect here: {why}; remove it", file=cfg.config_path)
