"""`prefpipe data check`: a rendered example per shape, the KTO label balance, skipped files; case-insensitive
choices on the CLI and in TOML."""

from __future__ import annotations

from helpers import write_jsonl


def check(run_cli, tiny_model, path, *extra):
    return run_cli("data", "check", path, "--model", tiny_model, *extra)


def test_plain_text_example_shows_the_boundary(run_cli, tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?\n", "chosen": "4", "rejected": "5"}])
    r = check(run_cli, tiny_model, f)
    assert r.exit_code == 0, r.output
    # The tiny tokenizer's BOS is <s> and EOS </s>: the BOS leads the prompt, the EOS ends each response.
    assert "example (plain text, d.jsonl row 1" in r.output
    assert "  chosen:     ⟦prompt⟧<s>Q: 2+2?\\n⟦|⟧4</s>\n" in r.output
    assert "  rejected:   ⟦prompt⟧<s>Q: 2+2?\\n⟦|⟧5</s>\n" in r.output
    assert "joined with no separator" in r.output


def test_conversational_example(run_cli, tiny_model, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
             "rejected": [{"role": "assistant", "content": "go"}]}]
    r = check(run_cli, tiny_model, write_jsonl(tmp_path / "c.jsonl", rows))
    assert r.exit_code == 0, r.output
    assert "example (conversational, c.jsonl row 1" in r.output
    # The template's assistant header belongs to the prompt; the response starts with the assistant's text.
    assert "assistant\\n⟦|⟧hello<|im_end|>\\n\n" in r.output
    assert "joined with no separator" not in r.output


def test_kto_label_balance(run_cli, tiny_model, tmp_path):
    rows = [{"prompt": f"q{i} ", "completion": f"a{i}", "label": i == 0} for i in range(4)]
    r = check(run_cli, tiny_model, write_jsonl(tmp_path / "k.jsonl", rows))
    assert r.exit_code == 0, r.output
    # 1 desirable, 3 undesirable: lambda_D = 3 * 1.0 / 1 makes lambda_D*n_D/(lambda_U*n_U) = 1.
    assert "labels:     1 desirable, 3 undesirable (ratio 0.33); --desirable_weight 3.0 balances them" in r.output


def test_skipped_files_are_listed(run_cli, tiny_model, tmp_path):
    d = tmp_path / "dir"
    write_jsonl(d / "a.jsonl", [{"prompt": "p ", "chosen": "c", "rejected": "r"}])
    (d / "README.md").write_text("notes")
    r = check(run_cli, tiny_model, d)
    assert r.exit_code == 0, r.output
    assert f"skipped {d / 'README.md'} (not a data file)" in r.output


def test_precompute_summary_mentions_skipped_files():
    from prefpipe.precompute.report import format_summary
    s = {"finalised": True, "kind": "paired", "cache": "c", "parts": 1, "parts_written": 1, "parts_reused": 0,
         "counts": {"rows_read": 1, "rows_kept": 1, "rows_written": 1, "rows_skipped": 0, "skipped": {},
                    "prompt_truncated": 0, "response_truncated": 0, "duplicates": 0},
         "skip_examples": {}, "has_reference": False, "wall_s": 1.0, "skipped_files": ["d/README.md"]}
    assert "files:    1 not data, skipped: d/README.md" in format_summary(s)


def test_loss_type_is_case_insensitive(tmp_path, run_cli):
    from prefpipe.options import build
    from prefpipe.pipeline.config import resolve
    from prefpipe.train.config import TrainConfig

    cfg = build(TrainConfig, {"model": "m", "data": "d", "out": "o", "loss_type": ["DPO", "Orpo"],
                              "reference": "LIVE"})
    assert cfg.loss_types == ("dpo", "orpo") and cfg.source.reference == "live"
    # The CLI accepts DPO: the command gets past option parsing to the --out check.
    regular = tmp_path / "f"
    regular.write_text("")
    r = run_cli("train", "--model", "m", "--data", "d", "--out", regular, "--loss_type", "DPO")
    assert r.exit_code == 2 and "--out exists and is not a directory" in r.stderr, r.output
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ndata = "d"\nloss_type = ["KTO", "dpo"]\n[train]\nlr_scheduler = "Cosine"\n')
    cfg = resolve(str(toml), {})
    assert cfg.losses == ("kto", "dpo") and cfg.train.optim.lr_scheduler == "cosine"
