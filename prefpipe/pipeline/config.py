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
  error naming the key and the file (as the file spells it: ``key 'generate.temperature'``), or the option when it
  was given on the command line.

How the code holds them: `resolve` reads defaults, file and options once into a flat {key: value} and builds from
it, at once, every phase's settings (`PipelineConfig`: the pipeline's own, prefpipe.pipeline.settings, and the
PrecomputeConfig, TrainConfig, GenSettings and GenerateConfig the phases run with), which is where a bad value
stops. The phases then only replace what the pipeline decides per cache, run or round (a cache's path and data,
the cache a run trains from, a round's model and directory: `from_cache`, `for_round`); the flat values are kept
as `recorded`, only for pipeline.json and a round's key.
"""

from __future__ import annotations

import contextlib
import difflib
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import MISSING, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from prefpipe.data.sources import is_hub_id
from prefpipe.errors import UserError
from prefpipe.evaluation.settings import GenSettings
from prefpipe.generation.config import GenerateConfig
from prefpipe.options import Option, OptionError, build, canonical_choice, cli_style, options, toml_style
from prefpipe.pipeline.effects import Combination, no_effect
from prefpipe.pipeline.settings import PipelineEval, PipelineSettings, PipelineTrain
from prefpipe.pipeline.sweep import needs_reference, split_losses
from prefpipe.precompute.config import PrecomputeConfig
from prefpipe.train.config import TrainConfig
from prefpipe.train.registry import KNOBS, entry_for, resolve_loss_type, unread_knobs


@dataclass(frozen=True)
class Key:
    """One pipeline key: its full name (the CLI option; `[eval]` keys start with `eval_`), its table, its option."""
    name: str
    section: str  # "" (top level), "precompute", "train", "eval", "generate"
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


Source = Literal["default", "file", "option"]  # where a key's value came from


@dataclass(frozen=True)
class PipelineConfig:
    """A resolved pipeline: its own settings and every phase's, typed, built and validated once by `resolve`. A
    phase call changes only what the pipeline decides per cache, run or round (`dataclasses.replace` of a cache's
    `out` and `data`, `overwrite`, the cache a run trains from, a round's model and directory: `for_round`)."""
    settings: PipelineSettings  # the top-level keys
    held_out: PipelineEval  # [eval] data, cache, gen, baseline
    precompute: PrecomputeConfig  # for `data` into RUNS_DIR/cache; `per_token` also when a loss entry needs it
    train: TrainConfig | None  # the paired losses' runs (None: there are none); from `data` when none needs a cache
    kto_train: TrainConfig | None  # the runs on single examples (kto_beta, kto_lr), from the KTO cache
    eval: GenSettings  # prefpipe eval --gen's settings for eval_gen
    generate: GenerateConfig | None  # with rounds: round 1's prefpipe generate
    sources: dict[str, Source]  # every key of `KEYS`
    # Every key as resolved from defaults, file and options (max_prompt_length resolved), before a phase's own
    # normalisation: what pipeline.json records and a round's key hashes, so it is only read whole.
    recorded: dict[str, Any]
    config_path: str | None = None

    @property
    def losses(self) -> tuple:
        """The loss types by their canonical names (`DPO`, `sigmoid` -> `dpo`)."""
        return _canonical(self.settings.loss_type)

    @property
    def betas(self) -> tuple:
        return tuple(self.settings.beta)


def _canonical(loss_types) -> tuple:
    """Canonical loss names; a name no loss has stays as written, for the train settings to refuse with the key
    named."""
    def canonical(text):
        try:
            return resolve_loss_type(text)
        except ValueError:
            return text
    return tuple(canonical(t) for t in loss_types)


def from_cache(tc: TrainConfig, cache: str) -> TrainConfig:
    """`tc` training from `cache`, whose path the pipeline decides per run (content-addressed, see run.py)."""
    return replace(tc, source=replace(tc.source, cache=cache, data=None))


def for_round(cfg: PipelineConfig, *, reference: str, policy: str, data: str, runs_dir: str,
              baseline: bool) -> PipelineConfig:
    """A round's ordinary pipeline (prefpipe.pipeline.rounds): caches scored by `reference`, runs starting from
    `policy` (told that a different reference is meant), `data` (the round's pairs) and `runs_dir` its own."""
    mismatch = policy != reference

    def trained(tc: TrainConfig | None) -> TrainConfig | None:
        if tc is None:
            return None
        s = tc.source  # rounds refuse `cache` and `kto_cache`: a cache here is RUNS_DIR/cache or cache-kto
        return replace(tc, out=runs_dir, source=replace(
            s, model=policy, data=data if s.data else None, cache=str(Path(runs_dir) / Path(s.cache).name)
            if s.cache else None, allow_reference_mismatch=s.allow_reference_mismatch or mismatch))
    pc = cfg.precompute
    recorded = {**cfg.recorded, "model": reference, "data": data, "runs_dir": runs_dir, "rounds": None,
                "eval_baseline": baseline,
                "allow_reference_mismatch": cfg.recorded["allow_reference_mismatch"] or mismatch}
    return replace(cfg, settings=replace(cfg.settings, model=reference, data=data, runs_dir=runs_dir, rounds=None),
                   held_out=replace(cfg.held_out, baseline=baseline), train=trained(cfg.train),
                   kto_train=trained(cfg.kto_train), generate=None, recorded=recorded,
                   precompute=replace(pc, data=data, out=str(Path(runs_dir) / "cache"),
                                      backend_options=replace(pc.backend_options, model=reference)))


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
    """Defaults, then the file, then `options` (only the ones given on the command line), built into every
    phase's settings now, so that a bad value stops the pipeline before any work."""
    values = {k.name: k.default for k in KEYS}
    sources: dict[str, Source] = {k.name: "default" for k in KEYS}
    if config_path:
        for name, v in read_toml(config_path).items():
            values[name], sources[name] = v, "file"
    for name, v in options.items():
        if name not in KEY_BY_NAME:
            raise KeyError(name)
        values[name], sources[name] = coerce(KEY_BY_NAME[name], v), "option"
    return _build(_Given(values, sources, config_path))


@dataclass(frozen=True)
class _Given:
    """The keys as given (`values`, flat, every key of `KEYS`), while `resolve` builds the settings from them."""
    values: dict[str, Any]
    sources: dict[str, Source]
    path: str | None

    def path_or(self, key: str, default_name: str) -> str:
        v = self.values[key]
        return v if v is not None else str(Path(self.values["runs_dir"]) / default_name)

    def table(self, section: str) -> dict:
        """The keys of a prefixed table under their own names (`eval_gen` -> `gen`)."""
        cut = len(PREFIXED[section])
        return {k.name[cut:]: self.values[k.name] for k in KEYS if k.section == section}

    @contextlib.contextmanager
    def as_written(self, prefix: str = ""):
        """Re-raise a settings dataclass's `OptionError` naming each key as the user gave it: `key 'lr'` and the
        file for a value from the file, `--lr` for one from the command line or a default."""
        try:
            yield
        except OptionError as e:
            from_file = [prefix + n for n in e.names if self.sources.get(prefix + n) == "file"]

            def style(n):
                return toml_style(written(prefix + n)) if prefix + n in from_file else cli_style(prefix + n)
            raise UserError(e.render(style), file=self.path if from_file else None) from None


def _build(g: _Given) -> PipelineConfig:
    """Every phase's settings, checked in the order the messages have always come in."""
    v = g.values
    where = f" (set it in {g.path} or with --%s)" if g.path else " (--%s)"
    if not v["model"]:
        raise UserError("no model given" + where % "model")
    if not v["data"]:
        raise UserError("no data given" + where % "data")
    for b in v["beta"] + (v["kto_beta"] or []):
        if b <= 0:
            raise UserError(f"every beta must be positive (got {b:g})", file=g.path)
    losses = _canonical(v["loss_type"])
    with g.as_written():
        settings, extra = build(PipelineSettings, v), build(PipelineTrain, v)  # options.as_given: kto_lr = nan
        # The train settings first: they check the loss names, which the precompute settings ask the registry about.
        every = _train_config(g, losses, cache=g.path_or("cache", "cache"), data=None, all_knobs=True)
        knobs = every.loss.knobs()
        per_token = bool(v["per_token"]) or any(entry_for(lt, knobs).needs_per_token_reference for lt in losses)
        pc = build(PrecomputeConfig, {**v, "out": g.path_or("cache", "cache"), "kto": False, "overwrite": False,
                                      "per_token": per_token})
        paired, unpaired = split_losses(losses)
        # Paired runs train from the paired cache when one of them reads reference log-probs, else from data.
        train = _train_config(g, paired, cache=g.path_or("cache", "cache"), data=None) \
            if needs_reference(paired) else _train_config(g, paired, cache=None, data=v["data"]) if paired else None
        kto_train = _train_config(g, unpaired, cache=g.path_or("kto_cache", "cache-kto"), data=None,
                                  betas=tuple(v["kto_beta"] or v["beta"]), lr=extra.kto_lr) if unpaired else None
    with g.as_written("eval_"):
        held_out = build(PipelineEval, g.table("eval"))
        gen = build(GenSettings, {**g.table("eval"), "device": v["device"], "dtype": v["dtype"],
                                  "chat_date": v["chat_date"]})
    generate = _check_rounds(g, losses)
    _refuse_keys_without_effect(g, Combination.of(settings, held_out, losses))
    recorded = {**v, "max_prompt_length": pc.input.max_prompt_length}
    return PipelineConfig(settings, held_out, pc, train, kto_train, gen, generate, g.sources, recorded, g.path)


def _train_config(g: _Given, losses: tuple, *, cache: str | None, data: str | None, betas: tuple | None = None,
                  lr: float | None = None, all_knobs: bool = False) -> TrainConfig:
    """One `run_training` call's settings: the keys, with the losses, betas and source the pipeline chose. A
    pipeline's loss knobs are checked against all its losses (`all_knobs`); a call for some of them gets the
    others' knobs at their defaults."""
    unread = {} if all_knobs else {k: KNOBS[k].default for k in unread_knobs(losses, g.values)}
    values = {**g.values, "cache": cache, "data": data, "out": g.values["runs_dir"], "loss_type": list(losses),
              "beta": list(betas or g.values["beta"]), "resume": True, **unread}
    if lr is not None:
        values["lr"] = lr
    return build(TrainConfig, values)


def _generate_config(g: _Given) -> GenerateConfig:
    """Round 1's `prefpipe generate` settings: the [generate] keys, the input keys, the top-level ones."""
    own = {o.name: g.values["generate_" + o.name] for o in GENERATE_OPTIONS}
    shared = {o.name: g.values[o.name] for o in options(GenerateConfig) if o.name not in own and o.name in g.values}
    out = str(Path(g.values["runs_dir"]) / "round-1" / "samples")
    return build(GenerateConfig, {**shared, **own, "out": out, "overwrite": False})


def _check_rounds(g: _Given, losses: tuple) -> GenerateConfig | None:
    """Rounds: a positive count, valid [generate] keys, and one training run per round (its model starts the
    next round, so a sweep would leave the next round's policy undecided). Round 1's generate settings, or None
    without rounds."""
    rounds = g.values["rounds"]
    if rounds is None:
        return None
    if rounds < 1:
        named = "key 'rounds'" if g.sources["rounds"] == "file" else "--rounds"
        raise UserError(f"{named} must be at least 1 (got {rounds}); leave it out when data holds pairs",
                        file=g.path if g.sources["rounds"] == "file" else None)
    with g.as_written("generate_"):
        generate = _generate_config(g)
    named = [k for k in ("cache", "kto_cache", "kto_data") if g.values[k] is not None]
    if named:
        raise UserError(f"rounds build their own data and caches in each round's directory; leave out "
                        f"{', '.join(named)}", file=g.path)
    n_runs = len(losses) * len(g.values["beta"])
    if n_runs != 1:
        raise UserError(f"rounds train one run per round, whose model starts the next round; this pipeline has "
                        f"{n_runs} (loss_type x beta); give one loss_type (a combination such as '1*dpo+1*sft' is "
                        "one) and one beta", file=g.path)
    return generate


def _refuse_keys_without_effect(g: _Given, c: Combination):
    found = no_effect(c, g.sources)
    if found is None:
        return
    name, why = found
    if g.sources[name] == "option":
        raise UserError(f"{cli_style(name)} has no effect here: {why}; leave it out")
    raise UserError(f"key '{written(name)}' has no effect here: {why}; remove it", file=g.path)


def written(name: str) -> str:
    """A key as a file spells it: `eval.gen` for `eval_gen` (its table drops the prefix), else its name."""
    key = KEY_BY_NAME[name]
    prefix = PREFIXED.get(key.section)
    return f"{key.section}.{name[len(prefix):]}" if prefix else name
