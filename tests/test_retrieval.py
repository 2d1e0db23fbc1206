"""common.evaluation.retrieval: R@1000 by hand, the embedded collection, the study on a tiny encoder."""
from __future__ import annotations

import pytest

from common.evaluation import retrieval
from conftest import SHARED

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not found")


def test_recall_at_1000_by_hand():
    """q1: relevant d1 (rank 5) and d2 (rank 1200), d3 is grade 1 (not relevant for recall);
    q2 is judged but not retrieved (0); q3 is retrieved but not judged (ignored)."""
    run = {"q1": {f"x{i}": 2000.0 - i for i in range(1500)}, "q3": {"d1": 1.0}}
    run["q1"]["d1"] = 2000.0 - 4.5  # rank 5 or 6
    run["q1"]["d2"] = 2000.0 - 1199.5
    qrels = {"q1": {"d1": 2, "d2": 3, "d3": 1, "d4": 0}, "q2": {"d9": 2}}
    measures = retrieval.retrieval_measures(run, qrels)
    assert measures["num_queries"] == 2
    assert measures["recall@100"] == pytest.approx(0.25) and measures["recall@1000"] == pytest.approx(0.25)
    run["q1"]["d2"] = 2000.0 - 900.5  # now rank 902: inside the top 1000, outside the top 100
    measures = retrieval.retrieval_measures(run, qrels)
    assert measures["recall@100"] == pytest.approx(0.25) and measures["recall@1000"] == pytest.approx(0.5)


@needs_shared
def test_embedded_collection(tmp_path):
    collection, topics, n = retrieval.embedded_collection(SHARED, tmp_path)
    assert n == 31766 == len(collection.read_text().splitlines())
    assert len(topics["dl20"].read_text().splitlines()) == 54


def test_dense_study_on_a_tiny_shared_dir(tmp_path, tiny_models):
    """The study's rows and table over a miniature shared dir (bm25 left out: no JVM here)."""
    import json

    from common.kinds.loading import load_model, save_model

    shared = tmp_path / "shared"
    lists = {"dl20": [("1", "what is a cat", ["c1", "c2", "s1"]), ("2", "stock market news", ["s1", "s2"])],
             "dl21": [("3", "volcano facts", ["v1", "c1"])], "dl22": [("4", "bread", ["b1"])]}
    text = {"c1": "a cat is a small mammal", "c2": "cats purr", "s1": "the stock market fell",
            "s2": "shares rose today", "v1": "volcanoes erupt lava", "b1": "bread is baked"}
    for year, entries in lists.items():
        (shared / year).mkdir(parents=True)
        (shared / year / "bm25.json").write_text(json.dumps([
            {"query": q, "hits": [{"qid": int(qid), "docid": d, "rank": r + 1, "score": 1.0 / (r + 1),
                                   "content": text[d]} for r, d in enumerate(docs)]}
            for qid, q, docs in entries]))
    (shared / "dl20" / "qrels.txt").write_text("1 0 c1 3\n1 0 c2 1\n2 0 s2 2\n2 0 v1 0\n")
    bi = load_model(str(tiny_models["bert"]), kind="bi")
    save_model(bi.model, bi.tokenizer, bi.state, tmp_path / "bi")
    rows, setting = retrieval.dense_study(shared, tmp_path / "work", [str(tmp_path / "bi")],
                                          asymmetric=[(str(tmp_path / "bi"), str(tmp_path / "bi"))],
                                          bm25=False, k=4, max_length=16, threads=1, report=lambda _: None)
    assert setting["passages"] == 6 and setting["queries"] == 2 and setting["judged_queries"] == 2
    assert len(rows) == 2 and rows[0]["build_speedup"] == pytest.approx(1.0)
    # the same index serves both rows; its queries are embedded by the same model: same numbers
    assert {k: rows[0][k] for k in retrieval.RETRIEVAL_MEASURES} == {k: rows[1][k] for k in retrieval.RETRIEVAL_MEASURES}
    from common.data.formats import read_candidates
    found = read_candidates(rows[0]["candidates"]).groupby("qid")["docid"].apply(set)
    assert rows[0]["recall@1000"] == pytest.approx((("c1" in found["1"]) + ("s2" in found["2"])) / 2)
    table = retrieval.study_table(rows, setting, "cmd")
    assert "| R@1000 |" in table and table.count("\n| ") == 3 and "Command: `cmd`" in table
