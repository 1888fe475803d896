"""Options declared once (prefpipe.options): every field in `-h` with its default, TOML key == CLI flag, errors
naming the option as the user wrote it, the pipeline reaching every train/precompute option, and a CLI that starts
without torch."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from helpers import make_pairs, write_jsonl
from prefpipe.data.formats import Columns
from prefpipe.data.settings import CheckSettings
from prefpipe.data.tokenize import TokenizeSettings
from prefpipe.errors import UserError
from prefpipe.evaluation.settings import EvalTargets, GenSettings
from prefpipe.pipeline import config as pconf
from prefpipe.precompute.config import PrecomputeConfig
from prefpipe.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- help

def leaf_fields(cls):
    """The option fields of a settings dataclass, groups flattened (walked here, not by prefpipe.options)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            yield from leaf_fields(hints[f.name])
        elif f.metadata.get("option"):
            yield f


def default_of(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def help_entries(text: str) -> dict:
    """{first flag: its whole entry, whitespace collapsed} from click's help output."""
    entries, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (--\w+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def expected_entry(f) -> tuple[str, str | None]:
    """(flag, the default text -h must show or None) for one field."""
    name = f.metadata.get("name") or f.name
    d = default_of(f)
    if isinstance(d, bool):
        return (f"--no_{name}" if d else f"--{name}"), None
    if f.metadata.get("default_text"):
        return f"--{name}", f.metadata["default_text"]
    if d is dataclasses.MISSING or d is None or d == "":
        return f"--{name}", None
    def text(x):  # a string whose whitespace the help would swallow is shown quoted, with \n for a newline
        return repr(x) if isinstance(x, str) and (x != x.strip() or "\n" in x or "\t" in x) else str(x)
    shown = ", ".join(map(text, d)) if isinstance(d, tuple) else text(d)
    return f"--{name}", shown


@pytest.mark.parametrize("command, classes", [
    (["train"], [TrainConfig]),
    (["precompute"], [PrecomputeConfig]),
    (["eval"], [EvalTargets, GenSettings]),
    (["data", "check"], [CheckSettings]),
])
def test_every_field_is_in_help_with_its_default(run_cli, command, classes):
    r = run_cli(*command, "-h")
    assert r.exit_code == 0, r.output
    entries = help_entries(r.output)
    fields = [f for c in classes for f in leaf_fields(c)]
    assert len(fields) >= 4
    for f in fields:
        flag, default = expected_entry(f)
        assert flag in entries, f"{flag} missing from {' '.join(command)} -h"
        if default is not None:
            assert " ".join(f"[default: {default}]".split()) in entries[flag], (flag, entries[flag])


def test_help_spot_checks(run_cli):
    """Hand-written expectations, independent of the dataclass walk above."""
    train = help_entries(run_cli("train", "-h").output)
    assert "[default: 5e-07]" in train["--lr"]
    assert "[default: prompt]" in train["--prompt_col"]
    assert "[default: max_length // 2]" in train["--max_prompt_length"]
    assert "[default: dpo]" in train["--loss_type"] and "kto" in train["--loss_type"]
    assert "--progress" not in train and "--no_progress" in train and "--resume" in train and "--fsdp" in train
    pre = help_entries(run_cli("precompute", "-h").output)
    assert "[default: 4096]" in pre["--part_rows"] and "[default: hf]" in pre["--backend"]
    for flag in ("--kto", "--no_reference", "--overwrite", "--no_progress", "--shard", "--verify"):
        assert flag in pre
    ev = help_entries(run_cli("eval", "-h").output)
    assert "[default: 'Question: {question}\\nAnswer: ']" in ev["--prompt_template"]
    assert "[default: '\\n\\nAssistant:']" in train["--turn_marker"]


def test_pipeline_has_every_train_and_precompute_option_with_the_same_default(run_cli):
    """Every option of `prefpipe train` and `prefpipe precompute` is a pipeline key (and a `pipeline` flag), less
    the four the pipeline sets itself."""
    fixed = {"out", "kto", "no_reference", "overwrite", "resume"}
    entries = help_entries(run_cli("pipeline", "-h").output)
    for cls in (TrainConfig, PrecomputeConfig):
        for f in leaf_fields(cls):
            name = f.metadata.get("name") or f.name
            if name in fixed:
                continue
            assert name in pconf.KEY_BY_NAME, name
            d = default_of(f)
            key_default = pconf.KEY_BY_NAME[name].default
            if name not in ("model", "data", "cache"):  # pipeline-level meaning (RUNS_DIR defaults)
                assert key_default == (list(d) if isinstance(d, tuple) else d), name
            assert f"--{name}" in entries, name
    assert "--recompute / --no_recompute" in entries["--recompute"]
    assert "--fsdp / --no_fsdp" in entries["--fsdp"]
    assert "[default: runs]" in entries["--runs_dir"]


# ---------------------------------------------------------------- TOML == flags

def _captured_pipeline_cfg(run_cli, monkeypatch, *args):
    import prefpipe.pipeline.run as run_mod

    seen = {}

    def fake_run(cfg, log):
        seen["cfg"] = cfg
        return {"report": {"best": "x"}, "timing_s": {}}
    monkeypatch.setattr(run_mod, "run_pipeline", fake_run)
    r = run_cli("pipeline", *args)
    assert r.exit_code == 0, r.output
    return seen["cfg"]


def _built(cfg):
    return cfg.train, cfg.precompute, cfg.eval


def test_toml_keys_and_flags_give_the_same_configs(run_cli, monkeypatch, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(f'''model = "{tmp_path}/m"
data = "{tmp_path}/d.jsonl"
beta = [0.2, 0.4]
device = "cpu"
progress = false
[precompute]
part_rows = 100
prompt_col = "question"
max_length = 256
[train]
lr = 2e-6
batch_size = 3
lr_scheduler = "cosine"
gradient_checkpointing = true
[eval]
gen = "{tmp_path}/q.jsonl"
max_new_tokens = 7
chat = true
''')
    from_file = _captured_pipeline_cfg(run_cli, monkeypatch, "--config", toml)
    from_flags = _captured_pipeline_cfg(
        run_cli, monkeypatch, "--model", f"{tmp_path}/m", "--data", f"{tmp_path}/d.jsonl", "--beta", "0.2",
        "--beta", "0.4", "--device", "cpu", "--no_progress", "--part_rows", "100", "--prompt_col", "question",
        "--max_length", "256", "--lr", "2e-6", "--batch_size", "3", "--lr_scheduler", "cosine",
        "--gradient_checkpointing", "--eval_gen", f"{tmp_path}/q.jsonl", "--eval_max_new_tokens", "7", "--eval_chat")
    tc, pc, gs = _built(from_file)
    assert (tc, pc, gs) == _built(from_flags)
    # ... and they are the values written, not defaults that happen to agree.
    assert tc.betas == (0.2, 0.4) and tc.device == "cpu" and tc.progress is False and pc.progress is False
    assert pc.part_rows == 100 and pc.input.columns == Columns(prompt="question") and tc.source.input.columns.prompt == "question"
    assert (pc.input.max_length, pc.input.max_prompt_length) == (256, 128) and tc.source.input.max_prompt_length == 128
    assert tc.optim.lr == 2e-6 and tc.optim.lr_scheduler == "cosine" and tc.loop.batch_size == 3
    assert tc.loop.gradient_checkpointing is True
    assert gs.max_new_tokens == 7 and gs.chat is True and gs.batch_size == 64 and gs.device == "cpu"


def test_pipeline_train_config_equals_prefpipe_train(run_cli, monkeypatch, tmp_path):
    """The same settings through `prefpipe train` and through the pipeline build the same TrainConfig."""
    import prefpipe.train.loop as loop

    seen = {}
    monkeypatch.setattr(loop, "run_training", lambda cfg: seen.setdefault("cfg", cfg) and {"runs": []})
    monkeypatch.setattr("prefpipe.train.cli.format_summary", lambda s: "")
    args = ["--lr", "3e-6", "--reference", "live", "--keep_checkpoints", "2", "--label_smoothing", "0.1",
            "--max_length", "300", "--loss_type", "robust", "--beta", "0.3"]
    r = run_cli("train", "--model", "m", "--cache", "c", "--out", "runs", *args, "--resume")  # the pipeline resumes
    assert r.exit_code == 0, r.output
    cfg = pconf.resolve(None, {"model": "m", "data": "d", "runs_dir": "runs", "lr": 3e-6, "reference": "live",
                               "keep_checkpoints": 2, "label_smoothing": 0.1, "max_length": 300,
                               "loss_type": ["robust"], "beta": [0.3]})
    assert pconf.from_cache(cfg.train, "c") == seen["cfg"]
    assert seen["cfg"].source.input.max_prompt_length == 150


# ---------------------------------------------------------------- errors

def _write(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text('model = "m"\ndata = "d"\n' + text)
    return p


@pytest.mark.parametrize("text, message", [
    ("gradient_checkpoint = true\n", "unknown key 'gradient_checkpoint' (did you mean 'gradient_checkpointing'?)"),
    ("[precompute]\npart_row = 8\n", "unknown key 'precompute.part_row' (did you mean 'part_rows'?)"),
    ("[precompute]\ngradient_checkpointing = true\n", "key 'precompute.gradient_checkpointing' belongs in [train]"),
    ("[train]\npart_rows = 8\n", "key 'train.part_rows' belongs in [precompute]"),
    ("[train]\nreference = \"both\"\n", "key 'reference' must be one of cached, live"),
    ("[precompute]\ngpu_memory_utilization = \"most\"\n", "key 'gpu_memory_utilization' must be a number"),
])
def test_unknown_misplaced_and_wrong_typed_keys(tmp_path, text, message):
    p = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        pconf.resolve(str(p), {})
    assert message in str(e.value) and str(p) in str(e.value)


def test_validation_names_the_option_as_written(run_cli, tmp_path):
    r = run_cli("train", "--model", "m", "--cache", "c", "--out", "o", "--lr", "0")
    assert r.exit_code == 2
    assert r.stderr.strip() == "prefpipe: error: --lr must be positive (got 0.0)"

    p = _write(tmp_path, "[train]\nlr = 0\n")
    with pytest.raises(UserError) as e:
        pconf.resolve(str(p), {})
    assert str(e.value) == f"file {p}: key 'lr' must be positive (got 0.0)"

    r = run_cli("pipeline", "--config", _write(tmp_path, ""), "--lr", "-1")
    assert r.exit_code == 2
    assert r.stderr.strip() == "prefpipe: error: --lr must be positive (got -1.0)"

    p = _write(tmp_path, "[precompute]\nmax_length = 64\nmax_prompt_length = 64\n")
    with pytest.raises(UserError, match=r"key 'max_prompt_length' \(64\) must be smaller than key 'max_length'"):
        pconf.resolve(str(p), {})
    r = run_cli("precompute", "--model", "m", "--data", "d", "--out", "o", "--part_rows", "0")
    assert r.exit_code == 2 and "--part_rows must be positive (got 0)" in r.stderr


# ---------------------------------------------------------------- what the pipeline can set now

def test_pipeline_reaches_train_and_precompute_only_options(tmp_path):
    p = _write(tmp_path, '''[precompute]
backend = "vllm"
gpu_memory_utilization = 0.5
tensor_parallel_size = 2
verify = 4
shard = "0/2"
[train]
fsdp = true
gradient_checkpointing = true
reference = "live"
allow_reference_mismatch = true
keep_checkpoints = 3
[eval]
gen = "q.jsonl"
question_col = "q"
''')
    cfg = pconf.resolve(str(p), {})
    tc = cfg.train
    assert tc.fsdp is True and tc.loop.gradient_checkpointing is True and tc.loop.keep_checkpoints == 3
    assert tc.source.reference == "live" and tc.source.allow_reference_mismatch is True
    pc = cfg.precompute
    assert (pc.backend, pc.backend_options.gpu_memory_utilization, pc.backend_options.tensor_parallel_size,
            pc.verify, pc.shard) == \
        ("vllm", 0.5, 2, 4, "0/2")
    assert pc.kto is False and pc.overwrite is False  # set per cache by the pipeline
    assert cfg.eval.question_col == "q"
    # Defaults stay today's when the file says nothing.
    plain = pconf.resolve(str(_write(tmp_path, "")), {})
    tc = plain.train
    assert tc.fsdp is False and tc.source.reference == "cached" and tc.loop.keep_checkpoints == 0
    assert plain.precompute.input.max_prompt_length == 512


# ---------------------------------------------------------------- max_prompt_length follows max_length

def test_prompt_budget_defaults_to_half_of_max_length():
    assert TokenizeSettings().max_prompt_length == 512
    assert TokenizeSettings(256).max_prompt_length == 128
    assert TokenizeSettings(257, 200).max_prompt_length == 200
    assert TokenizeSettings(300).metadata()["max_prompt_length"] == 150


def test_max_length_alone_works_through_the_cli(run_cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(6))
    r = run_cli("data", "check", data, "--model", tiny_model, "--max_length", "256")
    assert r.exit_code == 0, r.output
    assert "max_length=256, max_prompt_length=128" in r.output
    out = tmp_path / "cache"
    r = run_cli("precompute", "--model", tiny_model, "--data", data, "--out", out, "--max_length", "64",
                "--dtype", "float32", "--device", "cpu", "--no_progress")
    assert r.exit_code == 0, r.output
    tok = json.loads((out / "manifest.json").read_text())["metadata"]["tokenization"]
    assert tok["max_length"] == 64 and tok["max_prompt_length"] == 32  # the integer, as older caches record it


# ---------------------------------------------------------------- startup

def test_cli_imports_no_torch():
    code = ("import sys, prefpipe.cli; heavy = [m for m in ('torch', 'transformers', 'pyarrow') if m in sys.modules];"
            " print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == ""
