"""Tests of common.evaluation.results: the results parquet store and the generated markdown table."""

from __future__ import annotations

import pandas as pd
import pytest

from common.data.trec import CONVENTIONS
from common.evaluation.results import (
    append_results,
    has_result,
    load_results,
    markdown_table,
    write_table,
)


def _row(checkpoint, topics, **extra):
    return {"checkpoint": checkpoint, "topics": topics, **extra}


def test_load_missing_file_is_empty(tmp_path):
    df = load_results(tmp_path / "nope.parquet")
    assert isinstance(df, pd.DataFrame)
    assert len(df) == 0
    assert not has_result(tmp_path / "nope.parquet", "ckpt", "dl20")


def test_append_and_replace_on_same_key(tmp_path):
    path = tmp_path / "runs" / "results.parquet"
    append_results(path, [
        _row("ckpt-a", "dl20", **{"ndcg@10": 0.5}),
        _row("ckpt-a", "dl21", **{"ndcg@10": 0.4}),
    ])
    append_results(path, [_row("ckpt-b", "dl20", **{"ndcg@10": 0.6})])
    assert len(load_results(path)) == 3

    append_results(path, [_row("ckpt-a", "dl20", **{"ndcg@10": 0.55})])
    df = load_results(path)
    assert len(df) == 3
    replaced = df[(df["checkpoint"] == "ckpt-a") & (df["topics"] == "dl20")]
    assert replaced["ndcg@10"].tolist() == [0.55]
    assert has_result(path, "ckpt-a", "dl21")
    assert has_result(path, "ckpt-b", "dl20")
    assert not has_result(path, "ckpt-b", "dl21")
    assert [p.name for p in path.parent.iterdir() if p.suffix != ".lock"] == ["results.parquet"]


def test_duplicate_keys_in_one_call_keep_the_last(tmp_path):
    path = tmp_path / "results.parquet"
    append_results(path, [_row("c", "dl20", **{"ndcg@10": 0.1}), _row("c", "dl20", **{"ndcg@10": 0.2})])
    assert load_results(path)["ndcg@10"].tolist() == [0.2]


def test_union_of_columns(tmp_path):
    path = tmp_path / "results.parquet"
    append_results(path, [_row("c1", "dl20", method="heads", seen_pairs=20000, **{"ndcg@10": 0.6})])
    append_results(path, [_row("c2", "dl20", cpu_ms_real=12.5, machine="box")])
    df = load_results(path).set_index("checkpoint")
    for column in ("method", "seen_pairs", "ndcg@10", "cpu_ms_real", "machine", "timestamp"):
        assert column in df.columns
    assert pd.isna(df.loc["c1", "cpu_ms_real"])
    assert pd.isna(df.loc["c2", "seen_pairs"])
    assert df.loc["c1", "seen_pairs"] == 20000
    assert str(df["seen_pairs"].dtype) == "Int64"  # ints stay ints despite nulls


def test_rows_need_the_key(tmp_path):
    with pytest.raises(ValueError, match="topics"):
        append_results(tmp_path / "r.parquet", [{"checkpoint": "c"}])


def _table_frame(tmp_path):
    path = tmp_path / "results.parquet"
    common = {"run": "electra", "model_kind": "electra"}
    append_results(path, [
        _row("bm25", "dl20", run="bm25", method="bm25", **{"ndcg@10": 0.47963, "map@100": 0.26854}),
        _row("bm25", "dl21", run="bm25", method="bm25", **{"ndcg@10": 0.44583, "map@100": 0.13571}),
        _row("runs/e/seen_000040000", "dl20", method="initial", seen_pairs=40000, heads=144,
             ffn=36864, **common, **{"ndcg@10": 0.7, "map@100": 0.45},
             cpu_ms_worst=50.0, cpu_ms_worst_std=2.0, cpu_ms_real=20.375, cpu_ms_real_std=0.5,
             flops_macs=22_300_000_000, params=109_483_778, machine="xeon-8c", torch_version="2.13"),
        _row("runs/e/seen_000020000", "dl20", method="initial", seen_pairs=20000, heads=144,
             ffn=36864, **common, **{"ndcg@10": 0.68, "map@100": 0.44}),
        _row("runs/e/seen_000040000_heads_100", "dl20", method="heads", seen_pairs=60000,
             heads=100, ffn=36864, **common, **{"ndcg@10": 0.69}),
    ])
    return load_results(path)


def test_markdown_table_contents(tmp_path):
    text = markdown_table(_table_frame(tmp_path))
    lines = text.splitlines()
    header = lines[0]
    for column in ("Method", "Seen pairs", "Heads", "FFN dim", "DL20 NDCG@10", "DL20 MAP@100",
                   "DL21 NDCG@10", "DL21 MAP@100", "CPU ms (worst)", "CPU ms (real)",
                   "GMACs (fvcore)", "Params (M)"):
        assert f" {column} " in header
    assert "GPU ms" not in header  # no GPU timing recorded
    assert header.index("DL20 NDCG@10") < header.index("DL21 NDCG@10")

    rows = [line for line in lines[2:] if line.startswith("| ")]
    assert len(rows) == 4  # one per checkpoint
    methods = [row.split("|")[2].strip() for row in rows]
    assert methods == ["bm25", "initial", "initial", "heads"]
    assert "20,000" in rows[1] and "40,000" in rows[2]  # seen pairs ascending within method

    assert "0.4796" in rows[0] and "0.2685" in rows[0] and "0.1357" in rows[0]
    assert "0.7000" in rows[2]
    assert "50.0 ± 2.0" in rows[2] and "20.4 ± 0.5" in rows[2]
    assert "22.30" in rows[2] and "109.5" in rows[2]
    assert "–" in rows[0]  # bm25 has no seen pairs
    assert rows[3].count("–") >= 3  # heads checkpoint: no MAP, no DL21, no timings

    assert CONVENTIONS in text
    assert "Timings measured on: xeon-8c (torch 2.13)." in text


def test_markdown_table_without_timings(tmp_path):
    df = _table_frame(tmp_path)
    df = df[df["checkpoint"] == "bm25"]
    text = markdown_table(df)
    assert "CPU ms" not in text
    assert "Timings: none measured." in text
    assert CONVENTIONS in text


def test_markdown_table_empty():
    text = markdown_table(pd.DataFrame())
    assert CONVENTIONS in text


def test_write_table(tmp_path):
    df = _table_frame(tmp_path)
    out = write_table(df, tmp_path / "tables" / "results.md")
    assert out.read_text() == markdown_table(df)
    assert [p.name for p in out.parent.iterdir()] == ["results.md"]
