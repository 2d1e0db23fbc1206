"""Tests for common/data.py: readers, hydration, candidates parquet, triples, streaming."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from common.data.formats import (
    CANDIDATE_COLUMNS,
    DataError,
    MsMarcoV2Corpus,
    TriplesStream,
    TsvCollection,
    build_triples_from_qrels,
    candidates_to_run,
    check_disjoint,
    hydrate_run,
    read_candidates,
    read_candidates_json,
    read_qrels,
    read_queries_tsv,
    validate_candidates,
    write_candidates,
    write_triples_tsv,
)
from common.data.trec import read_trec_run

TREC_DL = Path(__file__).resolve().parents[2] / "shared" / "data" / "trec-dl"
needs_trec_dl = pytest.mark.skipif(not TREC_DL.is_dir(), reason=f"{TREC_DL} not available")


@pytest.fixture(scope="module")
def dl20():
    return read_candidates_json(TREC_DL / "dl20" / "bm25.json")


@pytest.fixture(scope="module")
def dl20_qrels():
    return read_qrels(TREC_DL / "dl20" / "qrels.txt")


def small_candidates() -> pd.DataFrame:
    return pd.DataFrame({
        "qid": ["1", "1", "2"],
        "query": ["what is a", "what is a", "what is b"],
        "docid": ["d1", "d2", "d3"],
        "rank": [1, 2, 1],
        "first_stage_score": [3.0, 2.0, 1.5],
        "passage": ["a is a letter", "a is a vowel", "b is a consonant"],
    })


# ------------------------------------------------------------------ shared JSON lists


@needs_trec_dl
def test_read_candidates_json_dl20(dl20):
    assert list(dl20.columns) == CANDIDATE_COLUMNS
    assert len(dl20) == 5400 and dl20["qid"].nunique() == 54
    assert dl20["rank"].dtype == "int32" and dl20["first_stage_score"].dtype == "float32"
    assert all(isinstance(q, str) for q in dl20["qid"])
    entries = json.loads((TREC_DL / "dl20" / "bm25.json").read_text())
    # Query order is the file's, and within a query the ranks run 1..100.
    assert list(dict.fromkeys(dl20["qid"])) == [str(e["hits"][0]["qid"]) for e in entries]
    for _, group in dl20.groupby("qid", sort=False):
        assert group["rank"].tolist() == list(range(1, 101))
    first = entries[0]["hits"][0]
    assert dl20.iloc[0]["passage"] == first["content"] and dl20.iloc[0]["docid"] == first["docid"]
    assert dl20.iloc[0]["query"] == entries[0]["query"]


@needs_trec_dl
def test_read_candidates_json_dl21_v2_docids():
    df = read_candidates_json(TREC_DL / "dl21" / "bm25.json")
    assert len(df) == 5300 and df["qid"].nunique() == 53
    assert df["docid"].str.fullmatch(r"msmarco_passage_\d\d_\d+").all()


def test_read_candidates_json_names_entry_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"query": "q", "hits": [
        {"qid": 1, "docid": "d", "rank": 1, "score": 1.0, "content": "x"},
        {"qid": 1, "docid": "e", "rank": 2, "score": 0.5},
    ]}]))
    with pytest.raises(DataError, match=r"bad\.json: entry 0, hit 1: field 'content'"):
        read_candidates_json(path)


# ------------------------------------------------------------ hydration from corpora


def write_fake_v2_corpus(root: Path, passages_per_shard: dict[int, list[str]]) -> dict[str, str]:
    """Write gzip shards in the official layout; return {pid: passage}.

    Offsets are byte offsets in the *uncompressed* shard; the texts contain multi-byte
    characters so that byte and character offsets differ."""
    root.mkdir(parents=True)
    expected = {}
    for shard, texts in passages_per_shard.items():
        data = b""
        for n, text in enumerate(texts):
            pid = f"msmarco_passage_{shard:02d}_{len(data)}"
            record = {"pid": pid, "passage": text, "spans": "(0,1)", "docid": f"msmarco_doc_{shard:02d}_{n}"}
            data += json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
            expected[pid] = text
        with gzip.open(root / f"msmarco_passage_{shard:02d}.gz", "wb") as f:
            f.write(data)
    return expected


def test_v2_corpus_hydrate_run(tmp_path):
    corpus_dir = tmp_path / "msmarco_v2_passage"
    texts = write_fake_v2_corpus(corpus_dir, {
        0: ["café au lait — naïve résumé", "second passage", "third “quoted” passage"],
        7: ["shard seven first", "long " * 20000, "shard seven ünïcödé second"],  # > one read chunk
    })
    pids = list(texts)
    run_lines = [
        f"1101 Q0 {pids[5]} 2 7.5 bm25",
        f"1101 Q0 {pids[1]} 1 9.0 bm25",
        f"1102 Q0 {pids[0]} 1 4.25 bm25",
        f"1102 Q0 {pids[3]} 2 3.0 bm25",
        f"1102 Q0 {pids[2]} 3 1.0 bm25",
    ]
    run_path = tmp_path / "run.bm25.txt.gz"
    with gzip.open(run_path, "wt") as f:
        f.write("\n".join(run_lines) + "\n")
    queries_path = tmp_path / "queries.tsv"
    queries_path.write_text("1101\tfirst query\n1102\tsecond query\n1103\tunused\n")

    run = read_trec_run(run_path)
    assert list(run.columns) == ["qid", "docid", "rank", "score"] and len(run) == 5
    cache = tmp_path / "cache"
    with MsMarcoV2Corpus(corpus_dir, cache_dir=cache) as corpus:
        df = hydrate_run(run, read_queries_tsv(queries_path), corpus, source="fake-v2")
        assert sorted(p.name for p in cache.iterdir()) == ["msmarco_passage_00", "msmarco_passage_07"]
    assert list(df.columns) == CANDIDATE_COLUMNS
    assert df["qid"].tolist() == ["1101", "1101", "1102", "1102", "1102"]
    assert df["rank"].tolist() == [1, 2, 1, 2, 3]
    assert df["first_stage_score"].tolist() == [9.0, 7.5, 4.25, 3.0, 1.0]
    assert df["query"].tolist() == ["first query"] * 2 + ["second query"] * 3
    assert all(df["passage"] == df["docid"].map(texts))
    # The decompressed shards are reused, not rebuilt, by the next corpus object.
    stamp = (cache / "msmarco_passage_07").stat().st_mtime_ns
    with MsMarcoV2Corpus(corpus_dir, cache_dir=cache) as corpus:
        assert corpus.get(pids[4]) == "long " * 20000
    assert (cache / "msmarco_passage_07").stat().st_mtime_ns == stamp


def test_v2_corpus_prefers_uncompressed_shard_and_checks_pid(tmp_path):
    texts = write_fake_v2_corpus(tmp_path / "corpus", {3: ["alpha", "beta"]})
    pid_alpha, pid_beta = texts
    # An uncompressed shard next to the .gz is used as is (here with different text).
    raw = (tmp_path / "corpus" / "msmarco_passage_03")
    raw.write_bytes(gzip.decompress((tmp_path / "corpus" / "msmarco_passage_03.gz").read_bytes())
                    .replace(b'"alpha"', b'"ALPHA"'))
    corpus = MsMarcoV2Corpus(tmp_path / "corpus")
    assert corpus.get(pid_alpha) == "ALPHA" and corpus.get(pid_beta) == "beta"
    with pytest.raises(DataError, match=r"msmarco_passage_04\.gz: shard not found"):
        corpus.get("msmarco_passage_04_0")
    with pytest.raises(DataError, match=r"msmarco_passage_03: byte offset 1: no JSON line"):
        corpus.get("msmarco_passage_03_1")  # not the start of a line
    with pytest.raises(DataError, match=f"line has pid '{pid_alpha}', expected 'msmarco_passage_03_00'"):
        corpus.get("msmarco_passage_03_00")  # right offset, but not the line's id
    with pytest.raises(DataError, match="not an MS MARCO v2 passage id"):
        corpus.get("8841823")
    corpus.close()


def test_v1_tsv_collection(tmp_path):
    path = tmp_path / "collection.tsv"
    path.write_text("0\tzero passage\n1\tone passage\n2\ttwo passage\n")
    full = TsvCollection(path)
    assert len(full) == 3 and full.get("2") == "two passage"
    some = TsvCollection(path, needed_ids=["1", "2"])
    assert len(some) == 2 and "0" not in some
    run = pd.DataFrame({"qid": ["5", "5"], "docid": ["2", "1"], "rank": [1, 2], "score": [2.0, 1.0]})
    df = hydrate_run(run, {"5": "q five"}, some, source="v1")
    assert df["passage"].tolist() == ["two passage", "one passage"]
    with pytest.raises(DataError, match=r"collection\.tsv: passage '0' not found"):
        some.get("0")
    run.loc[1, "docid"] = "0"
    with pytest.raises(DataError, match=r"v1: 1 of 2 passages unavailable, e\.g\. '0'"):
        hydrate_run(run, {"5": "q five"}, some, source="v1")
    with pytest.raises(DataError, match=r"v1: 1 of 1 run queries have no query text"):
        hydrate_run(run, {}, some, source="v1")
    path.write_text("0\tzero\n1 no tab here\n")
    with pytest.raises(DataError, match=r"collection\.tsv: line 2"):
        TsvCollection(path)


# ------------------------------------------------------------------- line readers


def test_read_trec_run_malformed_line_number(tmp_path):
    path = tmp_path / "bad.run"
    path.write_text("1 Q0 a 1 2.0 t\n1 Q0 b 2 1.0 t\n1 Q0 c three 0.5 t\n")
    with pytest.raises(DataError, match=r"bad\.run: line 3: malformed run line"):
        read_trec_run(path)
    path.write_text("1 Q0 a 1 2.0 t\n1 Q0 b 2 1.0\n")
    with pytest.raises(DataError, match=r"bad\.run: line 2: .*expected 6 fields"):
        read_trec_run(path)


def test_read_queries_and_qrels_errors(tmp_path):
    queries = tmp_path / "queries.tsv"
    queries.write_text("1\tone\n2\ttwo\n1\tagain\n")
    with pytest.raises(DataError, match=r"queries\.tsv: line 3: duplicate qid '1'"):
        read_queries_tsv(queries)
    queries.write_text("1\tone\n2\t \n")
    with pytest.raises(DataError, match=r"queries\.tsv: line 2"):
        read_queries_tsv(queries)
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("1 0 a 2\n1 0 b high\n")
    with pytest.raises(DataError, match=r"qrels\.txt: line 2: malformed qrels line"):
        read_qrels(qrels)


@needs_trec_dl
def test_read_real_qrels_and_queries(dl20_qrels):
    assert len(dl20_qrels) == 54
    assert sum(len(j) for j in dl20_qrels.values()) == 11386
    dev = read_queries_tsv(TREC_DL / "msmarco-dev-subset" / "queries.tsv")
    assert len(dev) == 6980 and dev["1048585"] == "what is paula deen's brother"


# --------------------------------------------------------------- validation, parquet


@pytest.mark.parametrize("corrupt, message", [
    (lambda df: df.assign(docid=["d1", "d1", "d3"]), r"1 duplicate \(qid, docid\) rows, e\.g\. \('1', 'd1'\)"),
    (lambda df: df.assign(passage=["x", None, "y"]), r"1 rows with missing or empty 'passage'.*\('1', 'd2'\)"),
    (lambda df: df.assign(passage=["x", "  ", "y"]), r"1 rows with missing or empty 'passage'"),
    (lambda df: df.assign(query=["q", "q", ""]), r"1 rows with missing or empty 'query'.*\('2', 'd3'\)"),
    (lambda df: df.drop(columns="rank"), r"missing column\(s\) \['rank'\]"),
])
def test_validate_candidates_errors(corrupt, message):
    validate_candidates(small_candidates(), source="ok")
    with pytest.raises(DataError, match=r"^src: .*" + message):
        validate_candidates(corrupt(small_candidates()), source="src")


def test_write_read_candidates_roundtrip_and_atomicity(tmp_path):
    path = tmp_path / "out" / "dl.candidates.parquet"
    df = small_candidates().assign(reranker_score=[0.5, 0.25, 0.75])  # extra columns are kept
    write_candidates(df, path)
    back = read_candidates(path)
    assert list(back.columns) == CANDIDATE_COLUMNS + ["reranker_score"]
    assert back["qid"].tolist() == ["1", "1", "2"]
    assert candidates_to_run(back, "reranker_score") == {"1": {"d1": 0.5, "d2": 0.25}, "2": {"d3": 0.75}}
    assert back["rank"].dtype == "int32" and back["first_stage_score"].dtype == "float32"
    assert back["passage"].tolist() == df["passage"].tolist()
    assert candidates_to_run(back) == {"1": {"d1": 3.0, "d2": 2.0}, "2": {"d3": 1.5}}

    # A rejected write leaves the previous file intact and no temporary file behind.
    with pytest.raises(DataError):
        write_candidates(df.assign(passage=["x", "", "y"]), path)
    with pytest.raises(DataError):  # fails after the temporary file was opened
        write_triples_tsv([("q", "p", "n"), ("q", "", "n")], tmp_path / "out" / "t.tsv")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dl.candidates.parquet"]
    assert read_candidates(path)["passage"].tolist() == df["passage"].tolist()

    pd.DataFrame({"qid": ["1"], "docid": ["d"]}).to_parquet(tmp_path / "partial.parquet")
    with pytest.raises(DataError, match=r"partial\.parquet: missing column\(s\) \['query', 'rank'"):
        read_candidates(tmp_path / "partial.parquet")


# ------------------------------------------------------------------------ triples


def triple_grades(triples, candidates, qrels):
    """For each triple, the grades of the docids that carry its positive / negative text."""
    by_text = {}
    for qid, query, docid, passage in candidates[["qid", "query", "docid", "passage"]].itertuples(index=False):
        by_text.setdefault((query, passage), set()).add(qrels.get(qid, {}).get(docid))
    return [(by_text[(q, p)], by_text[(q, n)]) for q, p, n in triples]


@needs_trec_dl
def test_triples_from_qrels_grades_and_determinism(dl20, dl20_qrels):
    rm3 = read_candidates_json(TREC_DL / "dl20" / "bm25_rm3.json")
    both = pd.concat([dl20, rm3], ignore_index=True)
    triples = build_triples_from_qrels(both, dl20_qrels, seed=13)
    assert len(triples) > 1000
    assert triples == build_triples_from_qrels(both, dl20_qrels, seed=13)
    other = build_triples_from_qrels(both, dl20_qrels, seed=14)
    assert other != triples and sorted(other) != sorted(triples)  # different samples, not just order
    for positive_grades, negative_grades in triple_grades(triples, both, dl20_qrels):
        assert any(g is not None and g >= 2 for g in positive_grades)
        assert 0 in negative_grades
    # Concatenated lists are deduplicated by docid: bm25 twice == bm25 once.
    doubled = pd.concat([dl20, dl20], ignore_index=True)
    assert build_triples_from_qrels(doubled, dl20_qrels, seed=13) == build_triples_from_qrels(dl20, dl20_qrels, seed=13)
    assert len(build_triples_from_qrels(both, dl20_qrels, seed=13, include_unjudged=True)) >= len(triples)


def test_triples_from_qrels_exact_counts():
    candidates = pd.DataFrame({
        "qid": ["q"] * 6 + ["r"] * 2 + ["s"],
        "query": ["Q"] * 6 + ["R"] * 2 + ["S"],
        "docid": ["p3", "p2", "rel1", "n1", "n2", "unj", "rp", "rn", "sp"],
        "rank": [1, 2, 3, 4, 5, 6, 1, 2, 1],
        "first_stage_score": [0.0] * 9,
        "passage": ["P3", "P2", "REL1", "N1", "N2", "UNJ", "RP", "RN", "SP"],
    })
    qrels = {"q": {"p3": 3, "p2": 2, "rel1": 1, "n1": 0, "n2": 0, "p_notext": 3},
             "r": {"rp": 2, "rn": 0}, "s": {"sp": 3}}  # s has no negatives
    triples = build_triples_from_qrels(candidates, qrels, seed=0, negatives_per_positive=4)
    assert sorted(triples) == sorted([("Q", "P2", "N1"), ("Q", "P2", "N2"), ("Q", "P3", "N1"),
                                      ("Q", "P3", "N2"), ("R", "RP", "RN")])
    with_unjudged = build_triples_from_qrels(candidates, qrels, seed=0, include_unjudged=True)
    assert {n for q, p, n in with_unjudged if q == "Q"} == {"N1", "N2", "UNJ"}
    one = build_triples_from_qrels(candidates, qrels, seed=0, negatives_per_positive=1)
    assert len(one) == 3


# ------------------------------------------------------------------ triples streaming


@pytest.mark.parametrize("name", ["triples.tsv", "triples.tsv.gz"])
def test_write_and_stream_triples(tmp_path, name):
    triples = [(f"query {i}", f"positive\t{i}\nline", f'negative "{i}"\r') for i in range(23)]
    path = tmp_path / name
    assert write_triples_tsv(triples, path) == 23
    expected = [(q, p.replace("\t", " ").replace("\n", " "), n.replace("\r", " ")) for q, p, n in triples]
    stream = TriplesStream(path)
    assert list(stream) == expected and stream.line_number == 23
    assert list(TriplesStream(path, skip_triples=20)) == expected[20:]
    assert list(TriplesStream(path, skip_triples=30)) == []
    for skip in (0, 5):
        shards = [list(TriplesStream(path, skip_triples=skip, rank=r, world_size=3)) for r in range(3)]
        assert shards[1] == expected[skip + 1::3]
        assert sorted(sum(shards, [])) == sorted(expected[skip:])
        assert sum(len(s) for s in shards) == len(expected) - skip
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_stream_malformed_triples_line(tmp_path):
    path = tmp_path / "triples.tsv"
    path.write_text("q\tp\tn\nq\tp\tn\nq\tp\nq\tp\tn\n")
    stream = TriplesStream(path, skip_triples=1, rank=1, world_size=2)
    with pytest.raises(DataError, match=r"triples\.tsv: line 3: expected 3 non-empty"):
        list(stream)
    path.write_text("q\tp\tn\nq\t\tn\n")
    with pytest.raises(DataError, match=r"triples\.tsv: line 2"):
        list(TriplesStream(path))
    with pytest.raises(ValueError):
        TriplesStream(path, rank=2, world_size=2)


# ----------------------------------------------------------------- topic leakage


@needs_trec_dl
def test_check_disjoint(dl20, dl20_qrels):
    with pytest.raises(DataError, match=r"train vs eval: 54 qids in both sets, e\.g\. .*and 49 more"):
        check_disjoint(dl20["qid"], dl20_qrels, "train vs eval")
    check_disjoint(dl20["qid"], read_qrels(TREC_DL / "dl21" / "qrels.txt"), "dl20 vs dl21")
    check_disjoint([23849], ["23849 "], "int vs str")  # qids are compared as str
    with pytest.raises(DataError):
        check_disjoint([23849], ["23849"], "int vs str")
