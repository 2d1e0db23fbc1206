"""Dense first stage (common.data.dense, 01_prefetch_passages.py dense): exact search against
brute force, FAISS, the index (reload, resume after an interruption), the CLI end to end
(dense -> mine -> teacher) and its refusals."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from common.data import dense
from common.data.formats import TriplesStream, read_candidates
from common.kinds.loading import load_model, save_model
from common.serving.rank import Ranker

prefetch = importlib.import_module("01_prefetch_passages").main
needs_faiss = pytest.mark.skipif(not dense.faiss_available(), reason="faiss-cpu not installed")

TOPICS = ["cats", "the stock market", "volcanoes", "baking bread", "football", "rivers", "planets"]
PASSAGES = [f"a passage about {t}, part {i}, with some words on {TOPICS[(i + 3) % 7]}"
            for i in range(23) for t in [TOPICS[i % 7]]]


def brute_force(queries, embeddings, k):
    scores = queries @ embeddings.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


@pytest.mark.parametrize("integer", [False, True])
def test_exact_search_equals_brute_force(integer):
    """Chunked exact search == numpy's full sort; integer vectors make many exact ties (kept in
    row order across chunk borders)."""
    rng = np.random.default_rng(0)
    if integer:
        emb = rng.integers(-1, 2, size=(500, 4)).astype(np.float32)
        queries = rng.integers(-1, 2, size=(7, 4)).astype(np.float32)
    else:
        emb = rng.standard_normal((500, 16)).astype(np.float32)
        queries = rng.standard_normal((7, 16)).astype(np.float32)
    for k in (1, 20, 500, 600):
        want_s, want_i = brute_force(queries, emb, min(k, 500))
        got_s, got_i = dense.exact_search(queries, emb, k, chunk=37, query_chunk=3)
        assert got_i.shape == (7, min(k, 500))
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-5)
    if integer:  # the ties are real: many rows share the k-th score
        assert (want_s[:, 19:20] == (queries @ emb.T)).sum() > 7 * 20


@needs_faiss
def test_faiss_flat_and_hnsw(tmp_path):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((2000, 32)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    queries = emb[rng.choice(2000, 20, replace=False)] + 0.1 * rng.standard_normal((20, 32)).astype(np.float32)
    np.save(tmp_path / dense.EMBEDDINGS_FILE, emb)
    meta = {"dim": 32, "collection": {"passages": 2000}}
    index = dense.DenseIndex(tmp_path, meta, np.load(tmp_path / dense.EMBEDDINGS_FILE, mmap_mode="r"),
                             [str(i) for i in range(2000)])
    want_s, want_i = brute_force(queries, emb, 50)
    flat_s, flat_i = dense.faiss_search(queries, index, 50, "flat")
    np.testing.assert_array_equal(flat_i, want_i)
    np.testing.assert_allclose(flat_s, want_s, atol=1e-5)
    (tmp_path / dense.INDEX_FILE).write_text("{}")
    hnsw_s, hnsw_i = dense.faiss_search(queries, index, 50, "hnsw", report=lambda _: None)
    recall = np.mean([len(set(a) & set(b)) / 50 for a, b in zip(hnsw_i, want_i)])
    assert recall > 0.95 and (tmp_path / dense.HNSW_FILE).is_file()
    assert (np.diff(hnsw_s, axis=1) <= 0).all()
    saved = json.loads((tmp_path / dense.INDEX_FILE).read_text())
    assert saved["hnsw"]["params"] == {"M": dense.HNSW_M, "efConstruction": dense.HNSW_EF_CONSTRUCTION}


# ----------------------------------------------------------------------------- tiny encoders


def bi_checkpoint(source, directory, seed=None):
    loaded = load_model(str(source), kind="bi")
    if seed is not None:  # another encoder: the same architecture, other weights
        torch.manual_seed(seed)
        with torch.no_grad():
            loaded.model.embeddings.word_embeddings.weight.add_(
                torch.randn_like(loaded.model.embeddings.word_embeddings.weight))
    save_model(loaded.model, loaded.tokenizer, loaded.state, directory)
    return directory


@pytest.fixture(scope="module")
def encoders(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("dense_encoders")
    return {"a": bi_checkpoint(tiny_models["bert"], root / "a"),
            "b": bi_checkpoint(tiny_models["bert"], root / "b", seed=1)}


@pytest.fixture()
def inputs(tmp_path):
    collection = tmp_path / "collection.tsv"
    collection.write_text("".join(f"d{i}\t{p}\n" for i, p in enumerate(PASSAGES)))
    queries = tmp_path / "queries.tsv"
    queries.write_text("".join(f"q{i}\twhat about {t}\n" for i, t in enumerate(TOPICS[:4])))
    return collection, queries


def quiet(_):
    pass


def test_index_reloads_and_resumes_to_the_same_file(encoders, inputs, tmp_path):
    ranker = dense.load_bi_encoder(str(encoders["a"]), "torch", max_length=32, batch_size=4)
    identity = dense.encoder_identity(ranker, str(encoders["a"]))
    collection = dense.read_collection(inputs[0])
    whole = dense.build_index(ranker, identity, collection, tmp_path / "whole", shard_size=5, report=quiet)
    assert whole.embeddings.shape == (23, 32) and whole.docids == [f"d{i}" for i in range(23)]
    np.testing.assert_allclose(whole.embeddings, ranker.encode(PASSAGES), atol=1e-5)
    assert not (tmp_path / "whole" / dense.SHARDS_DIR).exists()

    class Killed(Exception):
        pass

    def kill_after_2(shard):
        if shard == 2:
            raise Killed

    with pytest.raises(Killed):
        dense.build_index(ranker, identity, collection, tmp_path / "resumed", shard_size=5,
                          report=quiet, after_shard=kill_after_2)
    shards = sorted(p.name for p in (tmp_path / "resumed" / dense.SHARDS_DIR).iterdir())
    assert shards == [f"embeddings-0000{i}.npy" for i in range(3)]
    assert not (tmp_path / "resumed" / dense.EMBEDDINGS_FILE).exists()
    assert dense.read_meta(tmp_path / "resumed")["complete"] is False
    with pytest.raises(dense.data.DataError, match="not a complete dense index"):
        dense.DenseIndex.load(tmp_path / "resumed")
    # the rerun asks for another shard size: the interrupted build keeps its own
    resumed = dense.build_index(ranker, identity, collection, tmp_path / "resumed", shard_size=7, report=quiet)
    assert resumed.meta["shards_reused"] == 3 and resumed.meta["passages_encoded"] == 23 - 15
    assert ((tmp_path / "resumed" / dense.EMBEDDINGS_FILE).read_bytes()
            == (tmp_path / "whole" / dense.EMBEDDINGS_FILE).read_bytes())
    reloaded = dense.DenseIndex.load(tmp_path / "resumed")
    np.testing.assert_array_equal(reloaded.embeddings, whole.embeddings)
    assert reloaded.docids == whole.docids and reloaded.meta["identity"] == identity
    assert reloaded.size_bytes() == reloaded.meta["bytes"] > 23 * 32 * 4
    # a complete index is reused, not rebuilt
    said = []
    again = dense.build_index(ranker, identity, collection, tmp_path / "resumed", report=said.append)
    assert said[0].startswith("reusing the index") and again.meta["encode_seconds"] == resumed.meta["encode_seconds"]


def test_dense_cli_then_mine_and_teacher(encoders, inputs, tmp_path, tiny_models):
    collection, queries = inputs
    out, run = tmp_path / "dense.parquet", tmp_path / "dense.run"
    args = ["dense", "--encoder", str(encoders["a"]), "--collection", str(collection), "--queries",
            str(queries), "--index", str(tmp_path / "index"), "--k", "10", "--max_length", "32",
            "--shard_size", "8", "--output", str(out), "--run_file", str(run)]
    prefetch(args)
    df = read_candidates(out)
    assert list(df["qid"].unique()) == ["q0", "q1", "q2", "q3"]
    assert df.groupby("qid")["rank"].apply(list).tolist() == [list(range(1, 11))] * 4
    # the scores are the encoder's own cosines, and the list is its top 10
    ranker = Ranker.load(str(encoders["a"]), max_length=32)
    q = ranker.encode([f"what about {t}" for t in TOPICS[:4]])
    want_s, want_i = brute_force(q, ranker.encode(PASSAGES), 10)
    assert df["docid"].tolist() == [f"d{i}" for i in want_i.ravel()]
    np.testing.assert_allclose(df["first_stage_score"], want_s.ravel(), atol=1e-5)
    assert df["passage"].tolist() == [PASSAGES[i] for i in want_i.ravel()]
    assert len(run.read_text().splitlines()) == 40 and run.read_text().split()[5] == "dense"
    if dense.faiss_available():  # the same list through FAISS flat, reusing the index
        prefetch([*args[:-4], "--output", str(tmp_path / "flat.parquet"), "--search", "flat"])
        flat = read_candidates(tmp_path / "flat.parquet")
        assert flat["docid"].tolist() == df["docid"].tolist()
        prefetch([*args[:-4], "--output", str(tmp_path / "hnsw.parquet"), "--search", "hnsw"])
        hnsw = read_candidates(tmp_path / "hnsw.parquet")  # 23 passages: the graph finds them all
        assert hnsw["docid"].tolist() == df["docid"].tolist()
        assert dense.read_meta(tmp_path / "index")["hnsw"]["params"]["M"] == dense.HNSW_M

    # hard negatives from the dense list, then teacher scores for them
    qrels = tmp_path / "qrels.txt"
    qrels.write_text("".join(f"q{i} 0 {df[df['qid'] == f'q{i}']['docid'].iloc[0]} 3\n" for i in range(4)))
    mined = tmp_path / "mined.tsv"
    prefetch(["mine", "--candidates", str(out), "--qrels", str(qrels), "--eval_qrels", "",
              "--negative_number", "2", "--range_for_sampling", "2-10", "--output", str(mined)])
    triples = list(TriplesStream(mined))
    assert len(triples) == 8
    top = df[df["rank"] == 1].set_index("query")["passage"]
    window = df[df["rank"] >= 2].groupby("query")["passage"].apply(set)
    for query, positive, negative in triples:
        assert positive == top[query] and negative in window[query]
    scores = tmp_path / "teacher.parquet"
    prefetch(["teacher", "--triples", str(mined), "--checkpoint", str(encoders["a"]), "--max_length", "32",
              "--output", str(scores)])
    assert len(pd.read_parquet(scores)) == 8


def error_of(args) -> str:
    with pytest.raises(SystemExit) as exc:
        prefetch(args)
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_dense_refusals(encoders, inputs, tmp_path, tiny_models):
    collection, queries = inputs
    out = tmp_path / "out" / "dense.parquet"

    def args(encoder=encoders["a"], coll=collection, qs=queries, index=tmp_path / "index", length="32"):
        return ["dense", "--encoder", str(encoder), "--collection", str(coll), "--queries", str(qs),
                "--index", str(index), "--max_length", length, "--k", "5", "--output", str(out),
                "--run_file", str(tmp_path / "out" / "dense.run")]

    def nothing_written(index=tmp_path / "index"):
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        assert not index.exists()

    # a cross-encoder: a plain classifier dir and a slimrank cross checkpoint
    assert "is a cross-encoder (architectures ['BertForSequenceClassification']" in error_of(
        args(encoder=tiny_models["bert"]))
    cross = load_model(str(tiny_models["bert"]))
    save_model(cross.model, cross.tokenizer, cross.state, tmp_path / "cross")
    assert "is a cross-encoder (slimrank_model_kind cross" in error_of(args(encoder=tmp_path / "cross"))
    nothing_written()

    duplicated = tmp_path / "dup.tsv"
    duplicated.write_text("d1\tone\nd2\ttwo\n\nd1\tone again\n")
    assert error_of(args(coll=duplicated)) == f"error: {duplicated}: line 4: duplicate docid 'd1' (first on line 1)"
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert error_of(args(qs=empty)) == f"error: {empty}: no queries"
    nothing_written()

    # an index built by another encoder, or with another max length: refused naming both
    prefetch(args())
    built = (tmp_path / "index" / dense.EMBEDDINGS_FILE).read_bytes()
    message = error_of([*args(encoder=encoders["b"]), "--overwrite"])
    assert f"built by encoder {encoders['a']} (max_length 32" in message
    assert f"not by {encoders['b']} (max_length 32" in message
    message = error_of([*args(length="16"), "--overwrite"])
    assert "(max_length 32, pooling mean, backend torch), not by" in message and "(max_length 16," in message
    other = tmp_path / "other.tsv"
    other.write_text("".join(f"d{i}\t{p}\n" for i, p in enumerate(PASSAGES[:-1])))
    assert "covers another collection" in error_of([*args(coll=other), "--overwrite"])
    assert (tmp_path / "index" / dense.EMBEDDINGS_FILE).read_bytes() == built
    # existing outputs, and an index dir that is something else
    assert "output exists" in error_of(args())
    (tmp_path / "notindex").mkdir()
    (tmp_path / "notindex" / "x").write_text("x")
    assert "is not a dense index" in error_of([*args(index=tmp_path / "notindex"), "--overwrite"])


def test_pruned_encoder_masked_torch_equals_reshaped_onnx(tiny_models, inputs, tmp_path):
    """A pruned bi-encoder indexes like any other: the masked checkpoint on torch and its
    reshaped, ONNX-exported form on onnxruntime give the same list."""
    from common.kinds.loading import reshape_checkpoint
    from common.models.structure import zero_dead_weights
    from common.serving.onnx_export import export_onnx

    loaded = load_model(str(tiny_models["bert"]), kind="bi")
    loaded.state.kept_heads[1] = [0, 3]
    loaded.state.kept_ffn[2] = list(range(0, loaded.state.ffn_size, 3))
    loaded.masks.refresh()
    zero_dead_weights(loaded.model, loaded.state)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "masked")
    reshaped, _, _ = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    export_onnx(load_model(str(reshaped)), reshaped, max_length=32)
    collection, queries = inputs
    lists = {}
    for name, encoder, backend in (("masked", tmp_path / "masked", "torch"), ("reshaped", reshaped, "onnx")):
        out = tmp_path / f"{name}.parquet"
        dense.from_dense(str(encoder), collection, queries, tmp_path / f"index_{name}", out, k=8,
                         backend=backend, max_length=32, report=quiet)
        lists[name] = read_candidates(out)
        assert dense.read_meta(tmp_path / f"index_{name}")["identity"]["backend"] == backend
    assert lists["masked"]["docid"].tolist() == lists["reshaped"]["docid"].tolist()
    np.testing.assert_allclose(lists["masked"]["first_stage_score"], lists["reshaped"]["first_stage_score"],
                               atol=1e-4)


def test_ranks_share_the_encoding_and_give_the_same_file(encoders, inputs, tmp_path):
    """Two torchrun ranks (run one after the other here): rank 1 encodes the odd shards and
    leaves, rank 0 the even ones, then assembles the file one process writes."""
    ranker = dense.load_bi_encoder(str(encoders["a"]), "torch", max_length=32, batch_size=4)
    identity = dense.encoder_identity(ranker, str(encoders["a"]))
    collection = dense.read_collection(inputs[0])
    one = dense.build_index(ranker, identity, collection, tmp_path / "one", shard_size=5, report=quiet)
    seen = {0: [], 1: []}
    # rank 1 waits for rank 0 to create the dir: give it the description rank 0 writes first
    with pytest.raises(KeyboardInterrupt):
        dense.build_index(ranker, identity, collection, tmp_path / "two", shard_size=5, report=quiet,
                          after_shard=lambda s: (_ for _ in ()).throw(KeyboardInterrupt))
    for shard_file in (tmp_path / "two" / dense.SHARDS_DIR).iterdir():
        shard_file.unlink()
    assert dense.build_index(ranker, identity, collection, tmp_path / "two", shard_size=5, report=quiet,
                             after_shard=seen[1].append, rank=1, world_size=2) is None
    two = dense.build_index(ranker, identity, collection, tmp_path / "two", shard_size=5, report=quiet,
                            after_shard=seen[0].append, rank=0, world_size=2)
    assert seen == {0: [0, 2, 4], 1: [1, 3]}
    assert two.meta["shards_reused"] == 0 and two.meta["passages_encoded"] == 23
    assert ((tmp_path / "two" / dense.EMBEDDINGS_FILE).read_bytes()
            == (tmp_path / "one" / dense.EMBEDDINGS_FILE).read_bytes())
    assert two.docids == one.docids
