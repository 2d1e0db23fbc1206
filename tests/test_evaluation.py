"""Tests of common.data.trec: TREC DL conventions and agreement with published BM25 figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.trec import (
    CONVENTIONS,
    MEASURES,
    evaluate_run,
    ranked,
    write_trec_run,
)

DATA = Path("/work/shared/data/trec-dl")


# Local readers (common/data.py is developed separately; these tests must not depend on it).
def _bm25_run(topics: str) -> dict[str, dict[str, float]]:
    """The shared BM25 candidates as a run, scored by the hits' own BM25 ``score``."""
    run: dict[str, dict[str, float]] = {}
    for entry in json.loads((DATA / topics / "bm25.json").read_text()):
        for hit in entry["hits"]:
            run.setdefault(str(hit["qid"]), {})[str(hit["docid"])] = float(hit["score"])
    return run


def _qrels(topics: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for line in (DATA / topics / "qrels.txt").read_text().splitlines():
        if line.strip():
            qid, _, docid, grade = line.split()
            qrels.setdefault(qid, {})[docid] = int(grade)
    return qrels


def _parse_run_file(path: Path) -> list[tuple[str, str, str, int, str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        qid, q0, docid, rank, score, tag = line.split()
        rows.append((qid, q0, docid, int(rank), score, tag))
    return rows


needs_data = pytest.mark.skipif(not DATA.exists(), reason="shared TREC DL data not available")


# --------------------------------------------------------------------------- published figures


@needs_data
def test_bm25_dl20_matches_anserini():
    means, per_query = evaluate_run(_bm25_run("dl20"), _qrels("dl20"))
    assert round(means["ndcg@10"], 4) == 0.4796
    assert means["num_queries"] == 54
    assert list(per_query.columns) == ["qid", *MEASURES]
    assert len(per_query) == 54


@needs_data
def test_bm25_dl21_matches_anserini():
    means, _ = evaluate_run(_bm25_run("dl21"), _qrels("dl21"))
    assert round(means["ndcg@10"], 4) == 0.4458
    assert round(means["map@100"], 4) == 0.1357
    assert means["num_queries"] == 53


@needs_data
def test_int_ids_are_accepted():
    run = {int(q): docs for q, docs in _bm25_run("dl20").items()}
    assert evaluate_run(run, _qrels("dl20"))[0] == evaluate_run(_bm25_run("dl20"), _qrels("dl20"))[0]


# --------------------------------------------------------------------------- conventions

QRELS = {
    "1": {"a": 3, "b": 0, "c": 2},
    "2": {"x": 2, "y": 1},
}


def test_missing_judged_query_counts_zero():
    run = {"1": {"a": 3.0, "c": 2.0, "b": 1.0}, "2": {"x": 2.0, "y": 1.0}}
    full, _ = evaluate_run(run, QRELS)
    assert full["ndcg@10"] == pytest.approx(1.0)
    assert full["rr@10"] == pytest.approx(1.0)

    del run["2"]
    run["99"] = {"a": 1.0}  # unjudged query: ignored
    means, per_query = evaluate_run(run, QRELS)
    assert means["num_queries"] == 2
    assert list(per_query["qid"]) == ["1", "2"]
    row2 = per_query.set_index("qid").loc["2"]
    assert all(row2[m] == 0.0 for m in MEASURES)
    for m in MEASURES:
        assert means[m] == pytest.approx(full[m] / 2)


def test_empty_run_scores_zero_everywhere():
    means, per_query = evaluate_run({}, QRELS)
    assert all(means[m] == 0.0 for m in MEASURES)
    assert len(per_query) == 2


def test_rr_is_cut_at_depth_10():
    qrels = {"1": {"rel": 2}}
    ten_before = {f"n{i:02d}": 100.0 - i for i in range(10)}
    means, _ = evaluate_run({"1": {**ten_before, "rel": 1.0}}, qrels)  # rank 11
    assert means["rr@10"] == 0.0
    assert means["recall@100"] == 1.0  # still retrieved within 100
    means, _ = evaluate_run({"1": {**dict(list(ten_before.items())[:9]), "rel": 1.0}}, qrels)
    assert means["rr@10"] == pytest.approx(0.1)  # rank 10


def test_run_is_truncated_to_depth_100():
    qrels = {"1": {"rel": 2}}
    hundred_before = {f"n{i:03d}": 1000.0 - i for i in range(100)}
    means, _ = evaluate_run({"1": {**hundred_before, "rel": 1.0}}, qrels)  # rank 101
    assert means["recall@100"] == 0.0
    assert means["map@100"] == 0.0


def test_grade_one_counts_for_ndcg_only():
    qrels = {"1": {"partial": 1, "other": 0}}
    means, _ = evaluate_run({"1": {"partial": 2.0, "other": 1.0}}, qrels)
    assert means["ndcg@10"] == pytest.approx(1.0)
    assert means["map@100"] == 0.0
    assert means["rr@10"] == 0.0
    assert means["recall@100"] == 0.0


def test_ndcg_uses_graded_gains():
    qrels = {"1": {"high": 3, "low": 1}}
    best, _ = evaluate_run({"1": {"high": 2.0, "low": 1.0}}, qrels)
    swapped, _ = evaluate_run({"1": {"high": 1.0, "low": 2.0}}, qrels)
    assert best["ndcg@10"] == pytest.approx(1.0)
    assert 0 < swapped["ndcg@10"] < 1


def test_ties_break_by_docid_descending():
    qrels = {"1": {"a": 2, "z": 0}}
    # Exact tie: "z" ranks above "a" (trec_eval's comp_sim_docno).
    means, _ = evaluate_run({"1": {"a": 1.0, "z": 1.0}}, qrels)
    assert means["rr@10"] == pytest.approx(0.5)
    # Scores equal at run-file precision (6 decimals) are ties too.
    means, _ = evaluate_run({"1": {"a": 1.0000001, "z": 1.0}}, qrels)
    assert means["rr@10"] == pytest.approx(0.5)
    assert [d for d, _ in ranked({"a": 1.0000001, "z": 1.0})] == ["z", "a"]
    # ... and at full precision, trec_eval still holds scores as float32.
    assert [d for d, _ in ranked({"a": 1.0 + 2**-40, "z": 1.0}, score_decimals=None)] == ["z", "a"]
    assert [d for d, _ in ranked({"a": 1.5, "z": 1.0})] == ["a", "z"]


def test_nan_score_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        evaluate_run({"1": {"a": float("nan")}}, QRELS)


def test_conventions_state_the_trec_eval_flags():
    for flags in (
        "-c -m ndcg_cut.10",
        "-c -l 2 -m map_cut.100",
        "-c -l 2 -M 10 -m recip_rank",
        "-c -l 2 -m recall.100",
    ):
        assert flags in CONVENTIONS
    assert "\n" not in CONVENTIONS


# --------------------------------------------------------------------------- run files


def test_write_trec_run_round_trip(tmp_path):
    run = {
        2: {"d1": 0.5, "d2": 2.0, "d3": 0.5, "d4": -1.0},
        "10": {"b": 1.0, "a": 3.25},
        "1": {"only": 7.0},
    }
    path = write_trec_run(run, tmp_path / "sub" / "test.run", tag="mymodel")
    assert path == tmp_path / "sub" / "test.run"
    rows = _parse_run_file(path)
    assert [(q, d, r) for q, _, d, r, _, _ in rows] == [
        ("1", "only", 1),
        ("2", "d2", 1),
        ("2", "d3", 2),  # tie at 0.5: docid descending
        ("2", "d1", 3),
        ("2", "d4", 4),
        ("10", "a", 1),
        ("10", "b", 2),
    ]
    assert {q0 for _, q0, *_ in rows} == {"Q0"}
    assert {tag for *_, tag in rows} == {"mymodel"}
    assert rows[1][4] == "2.000000"
    assert [p.name for p in path.parent.iterdir()] == ["test.run"]  # no temp file left

    reread: dict[str, dict[str, float]] = {}
    for qid, _, docid, _, score, _ in rows:
        reread.setdefault(qid, {})[docid] = float(score)
    qrels = {"1": {"only": 2}, "2": {"d3": 2, "d1": 1}, "10": {"b": 3}}
    original, original_per_query = evaluate_run(run, qrels)
    again, again_per_query = evaluate_run(reread, qrels)
    assert original == again
    assert original_per_query.equals(again_per_query)


def test_write_trec_run_rejects_bad_tag(tmp_path):
    with pytest.raises(ValueError):
        write_trec_run({"1": {"a": 1.0}}, tmp_path / "x.run", tag="two words")


def test_interpolation_with_the_first_stage():
    """Per-query min-max of both scores, then weight * model + (1 - weight) * first stage."""
    import pandas as pd

    from common.data.trec import interpolate

    cands = pd.DataFrame({"qid": ["a", "a", "a", "b", "b"], "docid": list("xyzuv"),
                          "first_stage_score": [10.0, 5.0, 0.0, 3.0, 3.0]})
    model = [0.0, 1.0, 0.5, 2.0, 4.0]
    fused = interpolate(cands, model, 0.25)
    # a: first stage -> 1, .5, 0; model -> 0, 1, .5;  b: first stage constant -> 0; model -> 0, 1
    assert fused.tolist() == pytest.approx([0.75, 0.625, 0.125, 0.0, 0.25])
    assert interpolate(cands, model, 1.0).tolist() == pytest.approx([0, 1, 0.5, 0, 1])
    assert interpolate(cands, model, 0.0).tolist() == pytest.approx([1, 0.5, 0, 0, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate(cands, model, 1.5)
