"""A cache whose parts another tool rewrote still loads, or fails in one line naming the part and column."""

import shutil

import polars as pl
import pyarrow.parquet as pq
import pytest
from helpers import make_pairs, write_jsonl

from prefpipe.data.cache import read_cache, schema_for
from prefpipe.errors import UserError


@pytest.fixture(scope="module")
def cache(tiny_model, tmp_path_factory):
    from click.testing import CliRunner

    from prefpipe.cli import cli
    d = tmp_path_factory.mktemp("rewrite")
    data = write_jsonl(d / "pairs.jsonl", make_pairs(8, seed=3))
    out = d / "cache"
    res = CliRunner().invoke(cli, ["precompute", "--model", str(tiny_model), "--data", str(data), "--out", str(out),
                                   "--part_rows", "4", "--max_length", "64", "--max_prompt_length", "16",
                                   "--no_progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def rewrite(src, dst, part, change=lambda df: df):
    shutil.copytree(src, dst)
    p = dst / part
    change(pl.read_parquet(p)).write_parquet(p)
    return p


def test_part_rewritten_by_polars_loads(cache, tmp_path, run_cli):
    p = rewrite(cache, tmp_path / "c", "part-00001.parquet",
                lambda df: df.with_columns(pl.col("chosen_len").cast(pl.Int64)))
    written = pq.read_schema(p)
    assert str(written.field("row_id").type) == "large_string"
    assert str(written.field("prompt_ids").type).startswith("large_list")
    assert str(written.field("chosen_len").type) == "int64" and b"prefpipe" not in (written.metadata or {})

    got = read_cache(tmp_path / "c")
    assert got.table.schema == schema_for("paired")
    assert got.table.to_pydict() == read_cache(cache).table.to_pydict()
    assert read_cache(tmp_path / "c", columns=["row_id", "chosen_len"]).table.num_rows == 8
    res = run_cli("inspect", tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert "rows: 8" in res.output

    # The manifest still guards the rewritten part: a row lost in the rewrite is refused.
    rewrite(cache, tmp_path / "short", "part-00001.parquet", lambda df: df.head(3))
    with pytest.raises(UserError, match="part-00001.parquet: cache part has 3 rows, the manifest says 4"):
        read_cache(tmp_path / "short")


@pytest.mark.parametrize("change,column,phrase", [
    (lambda df: df.with_columns(pl.lit("abc").alias("ref_chosen")), "ref_chosen", "cannot be converted"),
    (lambda df: df.with_columns(pl.col("rejected_len").cast(pl.Int64) + 2**40), "rejected_len",
     "cannot be converted"),
    (lambda df: df.drop("chosen_ids"), "chosen_ids", "lacks this column"),
])
def test_part_that_cannot_be_conformed_is_one_line(cache, tmp_path, run_cli, change, column, phrase):
    rewrite(cache, tmp_path / "c", "part-00000.parquet", change)
    res = run_cli("inspect", tmp_path / "c")
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "part-00000.parquet" in err and f"column '{column}'" in err and phrase in err
