"""A tokenizer that does not load is one line naming the file and the library's own message, not a traceback.

The `tokenizers` library rejects a `tokenizer.json` it cannot parse with a bare `Exception`, and transformers
raises a `KeyError` on one missing a section; both used to escape `load_tokenizer` as a long traceback.
"""

import json
import shutil

import pytest
from helpers import one_line_error


def _corrupt(d, how: str):
    path = d / "tokenizer.json"
    doc = json.loads(path.read_text())
    if how == "merge_out_of_vocab":
        doc["model"]["merges"].insert(0, ["zzzq", "qqqz"])
        path.write_text(json.dumps(doc))
        return "Token `zzzq` out of vocabulary"
    if how == "merge_of_three":
        doc["model"]["merges"].insert(0, ["a", "b", "c"])
        path.write_text(json.dumps(doc))
        return "data did not match any variant of untagged enum MergeType"
    if how == "no_added_tokens":
        del doc["added_tokens"]
        path.write_text(json.dumps(doc))
        return "KeyError: 'added_tokens'"
    path.write_text(path.read_text()[:300])  # truncated
    return "Unterminated string"


@pytest.mark.parametrize("how", ["merge_out_of_vocab", "merge_of_three", "no_added_tokens", "truncated"])
@pytest.mark.parametrize("command", ["data check", "precompute"])
def test_a_tokenizer_that_does_not_load_is_one_line(how, command, tiny_model, pairs_file, run_cli, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    message = _corrupt(model, how)
    args = (("data", "check", pairs_file, "--model", model) if command == "data check" else
            ("precompute", "--model", model, "--data", pairs_file, "--out", tmp_path / "cache"))
    # The file is named where prefpipe can tell which one is rejected (it does not parse, or `tokenizers` refuses
    # it); a section transformers misses in an otherwise valid file leaves the directory named.
    where = model if how == "no_added_tokens" else model / "tokenizer.json"
    one_line_error(run_cli(*args), f"file {where}: cannot load a tokenizer (", message)
