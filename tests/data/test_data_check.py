"""`prefpipe data check` end to end, and every bad-input case: one line, file/row/column, exit 2."""

import json

import pytest
from helpers import make_pairs, write_jsonl


def check(run_cli, tiny_model, path, *extra):
    return run_cli("data", "check", path, "--model", tiny_model, *extra)


def assert_one_line_error(result, file, row, column, phrase):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("prefpipe: error: ")
    assert f"file {file}" in err
    if row is not None:
        assert f"row {row}" in err
    if column is not None:
        assert f"column '{column}'" in err
    assert phrase in err


def test_check_reports_format_counts_lengths_and_skips(run_cli, tiny_model, tmp_path):
    rows = make_pairs(10)
    rows[3]["rejected"] = rows[3]["chosen"]
    rows[6]["chosen"] = ""
    rows.append(dict(rows[0]))
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    r = check(run_cli, tiny_model, f)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "format:     paired" in out
    assert "rows:       11 read, 9 kept, 2 skipped" in out
    assert "duplicates: 1" in out
    assert "chosen_equals_rejected" in out and "row 4" in out
    assert "empty_response" in out and "row 7" in out
    for name in ("prompt", "chosen", "rejected"):
        assert f"\n  {name} " in out


def test_check_counts_truncation(run_cli, tiny_model, tmp_path):
    rows = [{"prompt": "word " * 50, "chosen": "long " * 50, "rejected": "x"}]
    r = check(run_cli, tiny_model, write_jsonl(tmp_path / "d.jsonl", rows), "--max_length", "32",
              "--max_prompt_length", "16")
    assert r.exit_code == 0
    assert "truncated:  1 prompt (from the left), 1 row with a response cut" in r.output


def test_missing_column(run_cli, tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c"}])
    assert_one_line_error(check(run_cli, tiny_model, f), f, 1, "rejected", "cannot detect the format")


def test_missing_value_in_a_later_row(run_cli, tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(3) + [{"prompt": "p", "chosen": "c"}])
    assert_one_line_error(check(run_cli, tiny_model, f), f, 4, "rejected", "missing value")


def test_number_where_text_expected(run_cli, tiny_model, tmp_path):
    rows = make_pairs(3)
    rows[2]["chosen"] = 42
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    assert_one_line_error(check(run_cli, tiny_model, f), f, 3, "chosen", "expected text, got int")


def test_non_bool_label(run_cli, tiny_model, tmp_path):
    rows = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "d", "label": 1}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    assert_one_line_error(check(run_cli, tiny_model, f), f, 2, "label", "must be a boolean")


def test_unparseable_jsonl_line(run_cli, tiny_model, tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in make_pairs(4)]
    lines[2] = '{"prompt": "p", "chosen": "c", "rejected": '
    f.write_text("\n".join(lines) + "\n")
    assert_one_line_error(check(run_cli, tiny_model, f), f, 3, None, "not valid JSON")


def test_empty_file(run_cli, tiny_model, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n")
    assert_one_line_error(check(run_cli, tiny_model, f), f, None, None, "file is empty")


@pytest.mark.parametrize("where,role", [("prompt", "wizard"), ("chosen", "user")])
def test_conversational_bad_role(run_cli, tiny_model, tmp_path, where, role):
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    bad = json.loads(json.dumps(good))
    bad[where][0]["role"] = role
    f = write_jsonl(tmp_path / "d.jsonl", [good, bad])
    assert_one_line_error(check(run_cli, tiny_model, f), f, 2, where, repr(role))


def test_missing_path(run_cli, tiny_model, tmp_path):
    r = check(run_cli, tiny_model, tmp_path / "nope.jsonl")
    assert_one_line_error(r, tmp_path / "nope.jsonl", None, None, "no such file")


def test_cli_process_prints_no_traceback(tiny_model, tmp_path):
    """The installed entry point, as a user runs it, in its own process."""
    import subprocess
    import sys
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": 1.5, "rejected": "r"}])
    p = subprocess.run([sys.executable, "-m", "prefpipe", "data", "check", str(f), "--model", str(tiny_model)],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip() == f"prefpipe: error: file {f}, row 1, column 'chosen': expected text, got float 1.5"
