"""The rules every option follows (prefpipe.options): no NaN and no meaningless infinity in any float option, on the
command line and in TOML; typed `\\n` decoded in templates and markers; option errors before torch is imported;
`data check` without torch; help at the terminal's width; suggestions for misspelled names; counts in words."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from helpers import make_pairs, one_line_error, write_jsonl
from prefpipe.evaluation.settings import EvalTargets
from prefpipe.pipeline import config as pconf
from prefpipe.precompute.config import PrecomputeConfig
from prefpipe.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# Where an infinite value means something: "never stop on drift". Everywhere else infinity is an error.
INFINITE_OK = {"max_drift"}


def float_options(cls):
    """(flag name, field) of every float option of `cls`, groups walked here (not by prefpipe.options)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.metadata.get("group"):
            yield from float_options(hint)
        elif f.metadata.get("option") and float in (hint, *typing.get_args(hint), *[
                a for t in typing.get_args(hint) for a in typing.get_args(t)]):
            yield f.metadata.get("name") or f.name, f


COMMANDS = {
    "train": (TrainConfig, ["train", "--model", "m", "--cache", "c", "--out", "o"]),
    "precompute": (PrecomputeConfig, ["precompute", "--model", "m", "--data", "d", "--out", "o"]),
    "eval": (EvalTargets, ["eval", "--model", "m", "--cache", "c"]),
}
CASES = [(cmd, name) for cmd, (cls, _) in COMMANDS.items() for name, _ in float_options(cls)]


def test_the_walk_finds_the_float_options():
    names = {n for _, n in CASES}
    assert {"lr", "beta", "max_drift", "ld_alpha", "lora_alpha", "gpu_memory_utilization"} <= names
    assert len(CASES) >= 20


@pytest.mark.parametrize("cmd, name", CASES)
def test_nan_is_refused_by_every_float_option(run_cli, cmd, name):
    r = run_cli(*COMMANDS[cmd][1], f"--{name}", "nan")
    assert one_line_error(r) == f"prefpipe: error: --{name} must be a number (got nan)"


@pytest.mark.parametrize("cmd, name", [c for c in CASES if c[1] not in INFINITE_OK])
@pytest.mark.parametrize("value", ["inf", "-inf", "1e999"])
def test_infinity_is_refused_where_it_means_nothing(run_cli, cmd, name, value):
    r = run_cli(*COMMANDS[cmd][1], f"--{name}", value)
    shown = "-inf" if value.startswith("-") else "inf"
    assert one_line_error(r) == f"prefpipe: error: --{name} must be finite (got {shown})"


def test_infinite_max_drift_is_accepted():
    cfg = pconf.resolve(None, {"model": "m", "data": "d", "max_drift": float("inf")})
    assert cfg.train.source.max_drift == float("inf")


def _toml(tmp_path, text):
    p = tmp_path / "run.toml"
    p.write_text('model = "m"\ndata = "d"\n' + text)
    return p


@pytest.mark.parametrize("text, message", [
    ("[train]\nlr = nan\n", "key 'lr' must be a number (got nan)"),
    ("[train]\nlr = inf\n", "key 'lr' must be finite (got inf)"),
    ("beta = [0.1, nan]\n", "key 'beta' must be a number (got nan)"),
    ("kto_beta = [inf]\n", "key 'kto_beta' must be finite (got inf)"),
    ("[train]\nkto_lr = nan\n", "key 'kto_lr' must be a number (got nan)"),
    ("[train]\nlabel_smoothing = -inf\n", "key 'label_smoothing' must be finite (got -inf)"),
    ("[precompute]\ngpu_memory_utilization = nan\n", "key 'gpu_memory_utilization' must be a number (got nan)"),
])
def test_nan_and_infinity_in_toml_name_the_key_and_the_file(tmp_path, text, message):
    p = _toml(tmp_path, text)
    with pytest.raises(pconf.UserError) as e:
        pconf.resolve(str(p), {})
    assert str(e.value) == f"file {p}: {message}"


def test_nan_on_the_pipeline_command_line_names_the_flag(run_cli, tmp_path):
    r = run_cli("pipeline", "--config", _toml(tmp_path, ""), "--lr", "nan")
    assert one_line_error(r) == "prefpipe: error: --lr must be a number (got nan)"


# ---------------------------------------------------------------- typed escapes

def test_eval_prompt_template_typed_in_a_shell_gets_real_newlines(run_cli, monkeypatch, tmp_path):
    import prefpipe.evaluation.evaluate as ev

    seen = {}

    def fake_generation(run, gen, settings, out):
        seen["template"] = settings.prompt_template
        return {"accuracy": 1.0, "correct": 1, "n": 1, "extraction": {"marker": 1, "last_number": 0, "none": 0}}
    monkeypatch.setattr(ev, "eval_generation", fake_generation)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    # What bash passes for 'Q: {question}\nA: ': a backslash and an n.
    r = run_cli("eval", "--model", model, "--gen", "q.jsonl", "--out", tmp_path / "o",
                "--prompt_template", "Q: {question}" + "\\" + "nA:" + "\\" + "t")
    assert r.exit_code == 0, r.output
    assert seen["template"] == "Q: {question}\nA:\t"
    assert "Type \\n and \\t for a newline and a tab" in " ".join(run_cli("eval", "-h").output.split())


@pytest.mark.parametrize("typed, meant", [
    ("\\n\\nHuman:", "\n\nHuman:"),
    ("a\\\\nb", "a\\nb"),  # \\ is one backslash: a literal backslash-n stays writable
    ("C:\\data", "C:\\data"),  # any other backslash is kept
    ("plain", "plain"),
])
def test_turn_marker_escapes_in_every_command_and_in_toml(tmp_path, typed, meant):
    from prefpipe.data.settings import CheckSettings
    from prefpipe.options import build

    assert build(CheckSettings, {"model": "m", "turn_marker": typed}).input.turn_marker == meant
    assert build(PrecomputeConfig, {"model": "m", "data": "d", "out": "o", "turn_marker": typed}).input.turn_marker == meant
    # A TOML literal string keeps the backslash, as a shell does.
    p = _toml(tmp_path, f"[precompute]\nturn_marker = '{typed}'\n[eval]\ngen = 'q.jsonl'\nprompt_template = '{typed}'\n")
    cfg = pconf.resolve(str(p), {})
    assert cfg.train.source.input.turn_marker == meant
    assert cfg.precompute.input.turn_marker == meant
    assert cfg.eval.prompt_template == meant


# ---------------------------------------------------------------- no torch for an option error, or for data check

PROBE = ("import atexit, sys\n"
         "atexit.register(lambda: sys.stderr.write('\\nTORCH_IMPORTED=%s\\n' % (sys.modules.get('torch') is not None)))\n"
         "sys.argv = ['prefpipe'] + sys.argv[1:]\n"
         "from prefpipe.cli import main\n"
         "main()\n")


def run_probe(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "m", "--cache", "c", "--out", "o", "--beta", "0"], "--beta must be positive"),
    (["train", "--model", "m", "--cache", "c", "--out", "o", "--max_steps", "-5"], "--max_steps must be >= 1"),
    (["train", "--model", "m", "--cache", "c", "--out", "o", "--lr", "nan"], "--lr must be a number (got nan)"),
    (["precompute", "--model", "m", "--data", "d", "--out", "o", "--part_rows", "0"], "--part_rows must be positive"),
    # engine checks live in BackendOptions.__post_init__ now, not in the backend constructor after the model load
    (["precompute", "--model", "m", "--data", "d", "--out", "o", "--batch_tokens", "0"],
     "--batch_tokens must be positive"),
    (["precompute", "--model", "m", "--data", "d", "--out", "o", "--backend", "vllm", "--load_in_4bit"],
     "--load_in_4bit quantizes the transformers model of --backend hf"),
    (["eval", "--model", "m", "--cache", "c", "--beta", "inf"], "--beta must be finite (got inf)"),
    (["eval", "--model", "m"], "give --cache"),
    (["pipeline", "--model", "m", "--data", "d", "--warmup_ratio", "2"], "--warmup_ratio must be in [0, 1)"),
])
def test_an_option_error_comes_before_torch_is_imported(tmp_path, args, message):
    r = run_probe(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err, probe = r.stderr.strip().rsplit("\n", 1)
    assert err.startswith("prefpipe: error: ") and message in err and "\n" not in err.strip(), r.stderr
    assert probe == "TORCH_IMPORTED=False", f"{' '.join(args)} imported torch before refusing an option"


def test_data_check_does_not_import_torch_and_reports_the_same(tmp_path, tiny_model, run_cli):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(8))
    r = run_probe("data", "check", data, "--model", tiny_model, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "TORCH_IMPORTED=False", r.stderr  # nothing else on stderr either
    # The same tokenizer as with torch loaded (this process has it): the report is identical, ids included.
    assert "torch" in sys.modules
    assert r.stdout == run_cli("data", "check", data, "--model", tiny_model).output


# ---------------------------------------------------------------- messages

def test_a_model_dir_without_tokenizer_files_says_what_was_looked_for(run_cli, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(2))
    model = tmp_path / "weights-only"
    model.mkdir()
    (model / "config.json").write_text("{}")
    err = one_line_error(run_cli("data", "check", data, "--model", model), f"file {model}")
    assert "no tokenizer files in this directory (looked for tokenizer.json, tokenizer.model, vocab.json" in err
    assert "one of: )" not in err


def test_misspelled_loss_type_and_choice_get_a_suggestion(run_cli):
    base = ["train", "--model", "m", "--cache", "c", "--out", "o"]
    one_line_error(run_cli(*base, "--loss_type", "dpoo"), "unknown loss 'dpoo' (did you mean 'dpo'?)")
    one_line_error(run_cli(*base, "--loss_type", "0.5*simpoo+0.5*dpo"), "(did you mean 'simpo'?)")
    r = run_cli(*base, "--reference", "lvie")
    assert r.exit_code == 2 and "(did you mean 'live'?)" in r.output


@pytest.mark.parametrize("rows, flags, missing, close", [
    ([{"prompt": "p", "chosen": "c", "rejcted": "r"}], [], "rejected", "rejcted"),  # the file's spelling
    ([{"prompt": "p", "chosen": "c", "rejected": "r"}], ["--rejected_col", "rejcted"], "rejcted", "rejected"),
])
def test_misspelled_column_gets_the_closest_column(run_cli, tiny_model, tmp_path, rows, flags, missing, close):
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    one_line_error(run_cli("data", "check", f, "--model", tiny_model, *flags), f"column '{missing}'",
                   f"missing '{missing}' (did you mean '{close}'?)")


def help_lines(columns: int) -> list[str]:
    """`prefpipe train -h` in a terminal `columns` wide (a real process: click's CliRunner forces 80 columns)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": str(columns)}
    r = subprocess.run([sys.executable, "-m", "prefpipe", "train", "-h"], capture_output=True, text=True, env=env,
                       check=True, timeout=120)
    return r.stdout.splitlines()


def test_help_uses_the_terminal_width():
    wide = help_lines(150)
    assert 120 < max(map(len, wide)) <= 150
    narrow = help_lines(80)
    options = narrow[narrow.index("Options:"):]  # the examples above are verbatim (click's \\b blocks)
    assert max(map(len, options)) <= 80
    # The default marker is one quoted token: no line of the help starts with its text.
    assert not any(line.strip().startswith("Assistant:") for line in wide)
    assert any("[default: '\\n\\nAssistant:']" in line for line in wide)


def test_plural():
    from prefpipe.wording import plural

    assert [plural(n, "part") for n in (0, 1, 2)] == ["0 parts", "1 part", "2 parts"]
    assert plural(1, "process", "processes") == "1 process" and plural(3, "process", "processes") == "3 processes"


def test_precompute_summary_counts_in_words():
    from prefpipe.precompute.report import format_summary

    counts = {"rows_read": 1, "rows_kept": 1, "rows_written": 1, "rows_skipped": 0, "skipped": {},
              "prompt_truncated": 1, "response_truncated": 1, "duplicates": 0}
    text = "\n".join(format_summary({"finalised": True, "counts": counts, "cache": "c", "kind": "paired", "parts": 1,
                                     "parts_written": 1, "parts_reused": 0, "skip_examples": {},
                                     "has_reference": False, "wall_s": 1.0}))
    assert "(paired, 1 part; 1 written now" in text and "1 row written" in text
    assert "truncated: 1 prompt, 1 row with a response cut" in text
    assert " 1 parts" not in text and " 1 rows" not in text and " 1 prompts" not in text


def test_non_finite_loss_in_a_float32_run_does_not_suggest_float32(run_cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(8))
    r = run_cli("train", "--model", tiny_model, "--data", data, "--loss_type", "sft", "--lr", "1e30",
                "--out", tmp_path / "runs", "--device", "cpu", "--dtype", "float32", "--batch_size", "4",
                "--max_steps", "3", "--no_progress")
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.output
    err = r.stderr.strip().splitlines()[-1]  # after the run's log lines
    # The run is float32 already: the advice is --lr alone (it said "or train in float32").
    assert err.startswith("prefpipe: error: sft: the loss is nan at step ") and err.endswith("; lower --lr"), err


@pytest.mark.parametrize("dtype, advice", [("float32", ""), ("bfloat16", "; try --dtype float32")])
def test_precompute_non_finite_advice_fits_the_dtype(dtype, advice):
    from prefpipe.errors import UserError
    from prefpipe.precompute.blocks import check_scores

    class Backend:
        def provenance(self):
            return {"name": "hf", "dtype": dtype}
    with pytest.raises(UserError) as e:
        check_scores([float("nan")], [2], [[5, 6]], [7], backend=Backend())
    assert str(e.value) == f"the model gave a non-finite log-prob (nan) for row 7{advice}"
