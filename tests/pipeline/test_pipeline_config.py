"""Pipeline config: TOML parsing, types, tables, relative paths, and option > file > default precedence."""

from pathlib import Path

import pytest

from prefpipe.errors import UserError
from prefpipe.pipeline.config import read_toml, resolve

BASE = 'model = "m"\ndata = "d.jsonl"\n'


def write(tmp_path: Path, text: str, name="run.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_file_and_options_in_order(tmp_path):
    p = write(tmp_path, BASE + 'beta = [0.05, 0.2]\n[train]\nlr = 1e-5\nbatch_size = 4\n[eval]\ngen = "q.jsonl"\n'
                     'max_new_tokens = 9\n')
    cfg = resolve(str(p), {"lr": 3e-4, "loss_type": ["kto"]})
    t = cfg.kto_train
    assert cfg.train is None  # kto alone: no paired runs
    assert t.optim.lr == 3e-4 and cfg.sources["lr"] == "option"  # option beats file
    assert t.loop.batch_size == 4 and cfg.sources["batch_size"] == "file"  # file beats default
    assert cfg.betas == (0.05, 0.2) and t.betas == (0.05, 0.2)
    assert cfg.losses == ("kto",) and t.loss_types == ("kto",)
    assert cfg.eval.max_new_tokens == 9  # [eval] keys drop their eval_ prefix
    assert t.loop.epochs == 1 and cfg.sources["epochs"] == "default"
    assert cfg.precompute.input.max_length == 1024 and cfg.precompute.input.max_prompt_length == 512


def test_single_values_for_list_keys_and_ints_as_floats(tmp_path):
    p = write(tmp_path, BASE + 'loss_type = "ipo"\nbeta = 1\nlr = 1\n')
    cfg = resolve(str(p), {})
    assert cfg.losses == ("ipo",) and cfg.betas == (1.0,) and cfg.train.optim.lr == 1.0


def test_relative_paths_follow_the_file(tmp_path):
    sub = tmp_path / "cfgdir"
    sub.mkdir()
    (sub / "sft").mkdir()
    p = write(sub, 'model = "sft"\ndata = "pairs.jsonl"\nruns_dir = "out"\n')
    cfg = resolve(str(p), {"cache": "rel/cache"})
    s = cfg.settings
    assert s.model == str(sub.resolve() / "sft") and cfg.precompute.model == s.model
    assert s.data == str(sub.resolve() / "pairs.jsonl")
    assert s.runs_dir == str(sub.resolve() / "out") and cfg.train.out == s.runs_dir
    assert s.cache == "rel/cache"  # a CLI path stays relative to the working directory
    # A model that does not exist next to the file is left alone (a hub id).
    p2 = write(sub, 'model = "org/name"\ndata = "x"\n', "hub.toml")
    assert resolve(str(p2), {}).settings.model == "org/name"


@pytest.mark.parametrize("text, message", [
    ('lrr = 1e-6\n', "unknown key 'lrr' (did you mean 'lr'?)"),
    ('lr = "fast"\n', "key 'lr' must be a number, got str 'fast'"),
    ('batch_size = 2.5\n', "key 'batch_size' must be an integer"),
    ('recompute = "yes"\n', "key 'recompute' must be true or false"),
    ('loss_type = ["dpo", "xyz"]\n', "key 'loss_type' must be one of"),
    ('beta = []\n', "key 'beta' must not be empty"),
    ('lr = 1e-6\n[train]\nlr = 2e-6\n', "key 'lr' is given twice ('lr' and 'train.lr')"),
    ('[precompute]\nlr = 1e-6\n', "key 'precompute.lr' belongs in [train]"),
    ('[optim]\nx = 1\n', "unknown table [optim]"),
    ('[eval]\ngenn = "x"\n', "unknown key 'eval.genn'"),
    ('lr = \n', "not valid TOML"),
])
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    refused_naming_the_file(tmp_path, text, message)


def refused_naming_the_file(tmp_path, text, message):
    """`BASE + text` as a pipeline file is refused with `message`, and the error names the file."""
    p = write(tmp_path, BASE + text)
    with pytest.raises(UserError) as e:
        resolve(str(p), {})
    assert message in str(e.value)
    assert str(p) in str(e.value)


def test_missing_required_keys_and_bad_values(tmp_path):
    with pytest.raises(UserError, match="no model given"):
        resolve(str(write(tmp_path, 'data = "d"\n')), {})
    with pytest.raises(UserError, match="no data given"):
        resolve(None, {"model": "m"})
    with pytest.raises(UserError, match="beta must be positive"):
        resolve(None, {"model": "m", "data": "d", "beta": [0.1, -1.0]})
    with pytest.raises(UserError, match="max_prompt_length"):
        resolve(None, {"model": "m", "data": "d", "max_length": 64, "max_prompt_length": 64})
    with pytest.raises(UserError, match="no such config file"):
        read_toml(tmp_path / "missing.toml")


def test_cli_options_override_the_file(tmp_path, run_cli, monkeypatch):
    """Through the real CLI: typed options win, untyped ones keep the file's values; bad files exit 2."""
    import prefpipe.pipeline.run as run_mod

    seen = {}

    def fake_run(cfg, log):  # only the parsed config matters here
        seen["cfg"] = cfg
        return {"report": {"best": "x"}, "timing_s": {}}
    monkeypatch.setattr(run_mod, "run_pipeline", fake_run)
    p = write(tmp_path, BASE + 'beta = [0.1, 0.3]\nrecompute = true\n[train]\nlr = 1e-5\nepochs = 3\n')
    r = run_cli("pipeline", "--config", p, "--lr", "2e-4", "--beta", "0.5", "--beta", "0.7", "--no_recompute",
                "--loss_type", "ipo")
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.train.optim.lr, cfg.train.loop.epochs, cfg.train.betas, cfg.settings.recompute, cfg.losses) == \
        (2e-4, 3, (0.5, 0.7), False, ("ipo",))

    r = run_cli("pipeline", "--config", p)
    assert r.exit_code == 0
    cfg = seen["cfg"]
    assert (cfg.train.optim.lr, cfg.train.betas, cfg.settings.recompute) == (1e-5, (0.1, 0.3), True)

    bad = write(tmp_path, BASE + "epochs = 'two'\n", "bad.toml")
    r = run_cli("pipeline", "--config", bad)
    assert r.exit_code == 2
    assert "key 'epochs' must be an integer" in r.output and "Traceback" not in r.output


def test_chat_date_is_one_top_level_key_for_every_phase(tmp_path):
    """The date chat templates render must be the same when the pipeline precomputes, trains, evaluates and
    decides whether a cache is reusable, so it is one top-level key."""
    from prefpipe.pipeline.run import expected_identity

    cfg = resolve(str(write(tmp_path, BASE + 'chat_date = "2025-01-31"\nloss_type = ["dpo", "kto"]\n')), {})
    assert cfg.precompute.input.chat_date == "2025-01-31"
    assert cfg.train.source.input.chat_date == "2025-01-31" and cfg.kto_train.source.input.chat_date == "2025-01-31"
    assert cfg.eval.chat_date == "2025-01-31"
    (tmp_path / "d.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    ident = expected_identity("m", str(tmp_path / "d.jsonl"), cfg, kto=False,
                              fingerprints={"model": "x", "tokenizer": {"fingerprint": "y"}})
    assert ident["tokenization"]["chat_date"] == "2025-01-31"
    with pytest.raises(UserError, match="belongs in the top level"):
        resolve(str(write(tmp_path, BASE + '[precompute]\nchat_date = "2025-01-31"\n', "bad.toml")), {})


def test_a_loss_knob_no_pipeline_loss_reads_is_refused_by_its_key(tmp_path):
    with pytest.raises(UserError, match="key 'simpo_gamma' is read by no loss of this call"):
        resolve(str(write(tmp_path, BASE + 'loss_type = ["dpo", "ipo"]\n[train]\nsimpo_gamma = 2.0\n')), {})
    # read by one of the pipeline's losses: accepted; the call that trains the others gets the default
    cfg = resolve(str(write(tmp_path, BASE + 'loss_type = ["dpo", "kto"]\n[train]\ndesirable_weight = 1.3\n',
                            "ok.toml")), {})
    assert cfg.kto_train.loss.desirable_weight == 1.3
    assert cfg.train.loss.desirable_weight == 1.0


@pytest.mark.parametrize("text, message", [
    ('kto_lr = 1e-4\n', "key 'kto_lr' has no effect here: it applies to losses on single examples (kto, "
     "apo_zero_unpaired), and loss_type has none; remove it"),
    ('kto_data = "k.jsonl"\n', "key 'kto_data' has no effect here"),
    ('[eval]\nprompt_template = "Q: {question}"\n', "key 'eval.prompt_template' has no effect here: it applies "
     "to eval_gen, which is not set; remove it"),
    ('[eval]\nbaseline = false\n', "key 'eval.baseline' has no effect here"),
    ('[eval]\nbatch_size = 8\n', "key 'eval.batch_size' has no effect here: no evaluation runs"),
    ('loss_type = "orpo"\n[precompute]\npart_rows = 10\n', "key 'part_rows' has no effect here: phase one "
     "(precompute) does not run: no loss here (orpo) needs reference log-probs"),
    ('loss_type = "orpo"\nrecompute = true\n', "key 'recompute' has no effect here: phase one"),
    ('loss_type = "orpo"\ncache = "c"\n', "key 'cache' has no effect here: the paired cache holds reference "
     "log-probs and no loss here (orpo) reads them"),
    ('loss_type = "sft"\nbeta = 0.5\n', "key 'beta' has no effect here: no loss here (sft) reads it"),
    ('loss_type = ["orpo", "kto"]\nbeta = 0.5\nkto_beta = 0.2\n', "key 'beta' has no effect here: no loss here "
     "(orpo, kto) reads it (kto runs take kto_beta)"),
])
def test_a_key_without_effect_is_refused_naming_key_and_file(tmp_path, text, message):
    refused_naming_the_file(tmp_path, text, message)


def test_keys_that_take_effect_pass_and_the_command_line_is_named_as_typed(tmp_path):
    # Each of these is read: a kto loss takes the kto keys, eval_data starts phase one for an ORPO-only sweep,
    # eval_cache alone feeds held-out reward accuracy (eval_batch_size: its pairs per forward).
    resolve(str(write(tmp_path, BASE + 'loss_type = ["dpo", "kto"]\nkto_lr = 1e-4\nkto_beta = 0.3\n')), {})
    resolve(str(write(tmp_path, BASE + 'loss_type = "orpo"\n[precompute]\npart_rows = 10\n[eval]\n'
                      'data = "e.jsonl"\n')), {})
    resolve(str(write(tmp_path, BASE + '[eval]\ncache = "held-out"\nbatch_size = 8\n')), {})
    resolve(None, {"model": "m", "data": "d"})  # defaults are never refused
    with pytest.raises(UserError) as e:
        resolve(None, {"model": "m", "data": "d", "kto_beta": [0.3]})
    assert str(e.value).startswith("--kto_beta has no effect here: no loss on single examples here uses beta")


def test_ld_dpo_asks_phase_one_for_per_token_log_probs_without_editing_the_settings():
    cfg = resolve(None, {"model": "m", "data": "d", "ld_alpha": 0.5})
    assert cfg.precompute.per_token is True
    assert cfg.recorded["per_token"] is False  # what the user set (the default), as pipeline.json records it
    plain = resolve(None, {"model": "m", "data": "d"})
    assert plain.precompute.per_token is False


@pytest.mark.parametrize("text, message", [
    ('rounds = 2\nloss_type = "dpo"\n[generate]\ntemperature = -1.0\n',
     "key 'generate.temperature' must be >= 0 (got -1.0)"),
    ('loss_type = ["dpo", "kto"]\n[train]\nwarmup_ratio = 1.5\n', "key 'warmup_ratio' must be in [0, 1) (got 1.5)"),
    # kto_lr = 0 once fell back to lr silently, and a negative one was refused as `--lr` without the file
    ('loss_type = ["dpo", "kto"]\n[train]\nkto_lr = 0.0\n', "key 'kto_lr' must be positive (got 0)"),
    ('loss_type = ["dpo", "kto"]\n[train]\nkto_lr = -1e-5\n', "key 'kto_lr' must be positive (got -1e-05)"),
])
def test_a_bad_phase_value_stops_the_pipeline_before_any_phase(tmp_path, run_cli, monkeypatch, text, message):
    """Every phase's settings are built when the pipeline loads: a value one of them refuses exits 2 naming the
    key and the file, and nothing runs."""
    import prefpipe.pipeline.run as run_mod

    ran = []
    monkeypatch.setattr(run_mod, "run_pipeline", lambda cfg, log: ran.append(cfg))
    p = write(tmp_path, BASE + text)
    r = run_cli("pipeline", "--config", p)
    assert r.exit_code == 2 and message in r.output and str(p) in r.output, r.output
    assert ran == []


def test_a_round_changes_only_its_model_data_and_directory(tmp_path):
    """A round's settings (for_round) are what resolving its model, data and directory afresh gives, except that
    training starts from the round's policy."""
    from dataclasses import replace

    from prefpipe.pipeline.rounds import round_config

    keys = {"model": "m", "data": "prompts.jsonl", "loss_type": ["dpo"], "eval_gen": "q.jsonl", "lr": 2e-6,
            "max_length": 128, "runs_dir": str(tmp_path)}
    top = resolve(None, {**keys, "rounds": 3, "generate_num_samples": 4})
    sub = round_config(top, 2, "policy-2")
    rd = str(tmp_path / "round-2")
    fresh = resolve(None, {**keys, "data": str(Path(rd) / "samples"), "runs_dir": rd, "eval_baseline": False,
                           "allow_reference_mismatch": True})  # the reference (m) is not the policy
    assert sub.settings == fresh.settings and sub.held_out == fresh.held_out and sub.eval == fresh.eval
    assert sub.precompute == fresh.precompute and sub.precompute.model == "m"
    assert sub.train == replace(fresh.train, source=replace(fresh.train.source, model="policy-2"))
    assert sub.kto_train is None and sub.generate is None
    assert {k: v for k, v in sub.recorded.items() if not k.startswith("generate_")} == \
        {k: v for k, v in fresh.recorded.items() if not k.startswith("generate_")}
    # A round whose reference is its policy (reference_model = "previous") scores its caches with it.
    prev = round_config(resolve(None, {**keys, "rounds": 3, "reference_model": "previous"}), 2, "policy-2")
    assert prev.precompute.model == "policy-2" and prev.train.source.allow_reference_mismatch is False
    kto = round_config(resolve(None, {**keys, "loss_type": ["kto"], "rounds": 3}), 2, "policy-2")
    assert kto.train is None and kto.kto_train.source.model == "policy-2" and kto.kto_train.out == rd
    assert kto.kto_train.source.cache == str(Path(rd) / "cache-kto")
