"""First contact with real data and real paths: every problem is one line naming file, row and column.

Covers text that looks like a date, invalid UTF-8, chat templates that refuse a row, gzip and JSON Lines
inputs, non-data files next to the data, the wrong-column message, empty prompts, and mistyped model paths.
"""

import gzip
import json

import pytest
from helpers import make_pairs, one_line_error, write_jsonl

from prefpipe.data.cache import read_cache
from prefpipe.data.formats import Dataset
from prefpipe.data.tokenize import PairTokenizer, TokenizeSettings, TokenStats
from prefpipe.errors import UserError

DATE = "2021-03-04"


def records(ds):
    return [r for b in ds.batches() for r in b]


# ---------------------------------------------------------------- text stays text (item 11)

def date_rows(where: str) -> list[dict]:
    rows = make_pairs(5)
    i = {"first": 0, "middle": 2}.get(where, 4)
    rows[i]["chosen"] = DATE
    rows[i]["prompt"] = "1999-12-31 23:59:59"
    return rows


def test_date_like_text_is_text_wherever_it_falls_in_a_batch(tmp_path):
    # Alone in a batch (batch_rows=1, or last in an odd-sized one) is where type inference used to strike.
    for where in ("first", "middle", "last"):
        rows = date_rows(where)
        f = write_jsonl(tmp_path / where / "d.jsonl", rows)
        for batch_rows in (1, 2, 3, 1024):
            rs = records(Dataset(str(f), batch_rows=batch_rows))
            assert [(r.prompt, r.chosen, r.rejected) for r in rs] == \
                [(r["prompt"], r["chosen"], r["rejected"]) for r in rows], (where, batch_rows)


def test_date_like_message_content_alone_in_a_batch_is_text(tmp_path):
    row = {"prompt": [{"role": "user", "content": "1999-12-31"}], "chosen": [{"role": "assistant", "content": DATE}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    rs = records(Dataset(str(write_jsonl(tmp_path / "d.jsonl", [row])), batch_rows=1))
    assert rs[0].prompt[0]["content"] == "1999-12-31" and rs[0].chosen[0]["content"] == DATE


def test_data_check_and_precompute_agree_on_a_date_row(run_cli, tiny_model, tiny_tokenizer, tmp_path):
    rows = date_rows("middle")
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    check = run_cli("data", "check", f, "--model", tiny_model)
    assert check.exit_code == 0, check.output
    assert "rows:       5 read, 5 kept, 0 skipped" in check.output
    # --part_rows 1: the date row is alone in its batch, where type inference used to make it a datetime.
    out = tmp_path / "c"
    pre = run_cli("precompute", "--model", tiny_model, "--data", f, "--out", out, "--part_rows", "1",
                  "--no_reference", "--no_progress")
    assert pre.exit_code == 0, pre.output
    assert "5 read, 5 kept" in pre.output
    chosen = read_cache(out).table.column("chosen_ids").to_pylist()[2]
    assert tiny_tokenizer.decode(chosen, skip_special_tokens=True) == DATE


# ---------------------------------------------------------------- encodings and damage (item 9)

def test_invalid_utf8_is_one_line_naming_file_and_row(run_cli, tiny_model, tmp_path):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps(r).encode() for r in make_pairs(3)]
    lines[1] = b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'  # Latin-1, not UTF-8
    f.write_bytes(b"\n".join(lines) + b"\n")
    one_line_error(run_cli("data", "check", f, "--model", tiny_model), f"file {f}", "row 2", "not valid UTF-8")
    with pytest.raises(UserError, match="row 2.*not valid UTF-8"):
        records(Dataset(str(f), batch_rows=1))
    # A UTF-8 byte-order mark (Windows editors write one) is not an encoding error.
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines[:1] + lines[2:]) + b"\n")
    assert [r.row for r in records(Dataset(str(bom)))] == [1, 2]


# ---------------------------------------------------------------- chat templates that refuse a row (item 8)

GEMMA_LIKE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_template_exception_is_one_line_with_row_and_message(run_cli, tmp_path):
    from prefpipe.tiny import build_tokenizer
    tok_dir = tmp_path / "gemma-like"
    build_tokenizer(tok_dir, chat_template=GEMMA_LIKE)
    ok = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}
    bad = {**ok, "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    f = write_jsonl(tmp_path / "chat.jsonl", [ok, ok, bad])
    err = one_line_error(run_cli("data", "check", f, "--model", tok_dir),
                         "chat.jsonl", "row 3", "column 'prompt'", "System role not supported")
    assert "chat template" in err


# ---------------------------------------------------------------- file kinds and directories (item 21)

def test_jsonl_gz_is_read_like_jsonl(run_cli, tiny_model, tmp_path):
    rows = make_pairs(6)
    plain = write_jsonl(tmp_path / "d.jsonl", rows)
    gz = tmp_path / "g" / "d.jsonl.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    want = [(r.row, r.prompt, r.chosen, r.rejected) for r in records(Dataset(str(plain)))]
    for path in (gz, gz.parent):
        assert [(r.row, r.prompt, r.chosen, r.rejected) for r in records(Dataset(str(path), batch_rows=4))] == want
    res = run_cli("data", "check", gz, "--model", tiny_model)
    assert res.exit_code == 0 and "6 read, 6 kept" in res.output, res.output


def test_truncated_gzip_is_one_line(tmp_path):
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in make_pairs(200)).encode())[:600])
    with pytest.raises(UserError, match="d.jsonl.gz.*decompress") as e:
        records(Dataset(str(gz)))
    assert "\n" not in str(e.value)


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
    rows = make_pairs(5)
    jl = tmp_path / "lines.json"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rs = records(Dataset(str(jl), batch_rows=2))
    assert [(r.row, r.prompt) for r in rs] == [(i + 1, r["prompt"]) for i, r in enumerate(rows)]
    # The document forms are still documents: a pretty-printed array and a one-line {"data": [...]} wrapper.
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(rows, indent=2))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": rows}) + "\n\n")
    for f in (pretty, wrapped):
        assert [r.prompt for r in records(Dataset(str(f)))] == [r["prompt"] for r in rows]


def test_non_data_files_in_a_directory_are_skipped_and_listed(tmp_path):
    d = tmp_path / "hub-dataset"
    write_jsonl(d / "data" / "train.jsonl", make_pairs(3))
    (d / "README.md").write_text("# a dataset card\n")
    (d / ".gitattributes").write_text("*.jsonl filter=lfs\n")
    write_jsonl(d / ".ipynb_checkpoints" / "train-checkpoint.jsonl", make_pairs(3, seed=9))  # a stale copy
    ds = Dataset(str(d))
    assert [s.name for s in ds.sources] == ["data/train.jsonl"]
    assert sorted(ds.skipped_files) == sorted(str(d / n) for n in
                                              (".gitattributes", ".ipynb_checkpoints/train-checkpoint.jsonl",
                                               "README.md"))
    assert len(records(ds)) == 3
    # A glob is a directory listing too: README.md is skipped, not an "unsupported file type" error.
    g = Dataset(str(d / "**" / "*"))
    assert [s.path for s in g.sources] == [d / "data" / "train.jsonl"] and g.skipped_files == [str(d / "README.md")]
    with pytest.raises(UserError, match="no data files found.*found only .*README.md"):
        Dataset(str(d / "*"))


def test_wrong_columns_error_lists_the_columns_found(run_cli, tiny_model, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer_good": "a", "answer_bad": "b"}])
    one_line_error(run_cli("data", "check", f, "--model", tiny_model), f"file {f}", "row 1", "column 'prompt'",
                   "found 'question', 'answer_good', 'answer_bad'", "--prompt_col")


# ---------------------------------------------------------------- empty prompts

def test_empty_prompt_is_kept_with_bos_and_skipped_without(run_cli, tiny_model, tiny_tokenizer, tmp_path):
    from tokenizers import processors
    from transformers import AutoTokenizer
    no_bos = AutoTokenizer.from_pretrained(tiny_model)
    no_bos.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    no_bos.save_pretrained(tmp_path / "no-bos")
    rows = [{"prompt": "", "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    f = write_jsonl(tmp_path / "d.jsonl", rows)

    ds = Dataset(str(f))
    stats = TokenStats()
    out = PairTokenizer(tiny_tokenizer, TokenizeSettings()).tokenize(records(ds), stats, ds.paired)
    assert out["prompt_ids"][0] == [tiny_tokenizer.bos_token_id] and stats.rows_kept == 2
    assert "2 read, 2 kept, 0 skipped" in run_cli("data", "check", f, "--model", tiny_model).output

    res = run_cli("data", "check", f, "--model", tmp_path / "no-bos")
    assert res.exit_code == 0, res.output
    assert "2 read, 1 kept, 1 skipped" in res.output
    # The printed reason says exactly when the skip happens (the old text blamed any empty prompt).
    assert "empty_prompt: the prompt is empty and the tokenizer adds no BOS" in res.output and "row 1" in res.output


# ---------------------------------------------------------------- model paths (item 12)

@pytest.mark.parametrize("spec", ["models/nope", "./nope", "../nope", "~/prefpipe-no-such-model", "a/b/c",
                                  "ABSOLUTE"])
def test_mistyped_model_path_fails_at_once(run_cli, tmp_path, monkeypatch, spec):
    from prefpipe.model_paths import resolve_model_dir
    from prefpipe.modeling import load_model
    from prefpipe.tokenizer import load_tokenizer
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/nope` reads as a path because `models/` is here
    spec = str(tmp_path / "nope") if spec == "ABSOLUTE" else spec
    for load in (resolve_model_dir, load_tokenizer, load_model):
        with pytest.raises(UserError, match="no such model directory") as e:
            load(spec)
        assert e.value.file == spec and "hub" not in str(e.value)
    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(2))
    one_line_error(run_cli("data", "check", f, "--model", spec), f"file {spec}", "no such model directory")


def test_model_file_instead_of_directory(tmp_path, tiny_model):
    from prefpipe.tokenizer import load_tokenizer
    with pytest.raises(UserError, match="not a model directory"):
        load_tokenizer(str(tiny_model / "config.json"))


def test_home_relative_model_directory_is_found(tmp_path, monkeypatch, tiny_model):
    from prefpipe.model_paths import resolve_model_dir
    from prefpipe.tokenizer import load_tokenizer
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tiny").symlink_to(tiny_model, target_is_directory=True)
    assert resolve_model_dir("~/tiny").resolve() == tiny_model.resolve()
    assert load_tokenizer("~/tiny").bos_token == "<s>"


def test_uncached_hub_id_offline_says_how_to_fetch_it(run_cli, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from prefpipe.model_paths import resolve_model_dir
    from prefpipe.modeling import load_model
    from prefpipe.tokenizer import load_tokenizer
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never the network, whatever the env
    monkeypatch.chdir(tmp_path)
    hub_id = "prefpipe-tests/no-such-model"
    for load in (resolve_model_dir, load_tokenizer, load_model):
        with pytest.raises(UserError, match="not in the local Hugging Face cache") as e:
            load(hub_id)
        assert f"hf download {hub_id}" in str(e.value) and f"huggingface-cli download {hub_id}" in str(e.value)
    f = write_jsonl(tmp_path / "d.jsonl", make_pairs(2))
    one_line_error(run_cli("data", "check", f, "--model", hub_id), "not in the local Hugging Face cache")
