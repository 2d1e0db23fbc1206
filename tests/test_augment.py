"""Pseudo-queries from training-side passages (01 augment) and mixed sets (01 mix)."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

from common.data.augment import (Doc2Query, build_augmented_set, evaluation_passages, mix_sets,
                                 pseudo_queries)
from common.data.distill import build_distillation_set, fuse_distillation_set
from common.data.formats import DataError, TriplesStream, read_candidates_json
from common.models.loading import resolve_model_path
from conftest import SHARED
from test_distill import _tiny_bert_dir

needs_shared = pytest.mark.skipif(not (SHARED / "dl21" / "bm25.json").is_file(),
                                  reason=f"shared TREC DL data not found under {SHARED}")

PASSAGES = {
    "d1": "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built for the 1889 World's Fair. "
          "Engineers of Gustave Eiffel's company designed it.",
    "d2": "Photosynthesis converts light energy into chemical energy stored in glucose. Plants, algae and "
          "cyanobacteria perform it in their chloroplasts.",
    "d3": "A median is the middle value of a sorted list of numbers!  With an even count it is the mean of "
          "the two middle values.",
}


def test_each_pseudo_query_comes_from_its_passage():
    table = pseudo_queries(PASSAGES, 60, seed=3)
    assert table["query"].is_unique and set(table["method"]) == {"crop", "ict", "keywords"}
    assert list(table["method"][:3]) == ["crop", "ict", "keywords"]  # methods in turn
    for q, method, docid in zip(table["query"], table["method"], table["docid"]):
        text = PASSAGES[docid]
        if method == "crop":  # a contiguous span of the passage's words
            assert f" {q} " in f" {' '.join(text.split())} " and 1 <= len(q.split()) <= 12
        elif method == "ict":  # one sentence of it
            assert q in " ".join(text.split()) and len(q.split()) >= 3
        else:  # its words, lower-cased, no stop word
            words = text.lower()
            assert all(w in words for w in q.split()) and "the" not in q.split() and 2 <= len(q.split()) <= 5
    again = pseudo_queries(PASSAGES, 60, seed=3)
    pd.testing.assert_frame_equal(table, again)  # deterministic under the seed
    assert not pseudo_queries(PASSAGES, 60, seed=4).equals(table)
    with pytest.raises(ValueError, match="--methods"):
        pseudo_queries(PASSAGES, 5, methods=("paraphrase",))
    with pytest.raises(ValueError, match="--generator"):
        pseudo_queries(PASSAGES, 5, methods=("generator",))


def test_a_doc2query_generator_runs_the_real_code_path(tmp_path):
    """A tiny random-init T5 (nonsense queries, the real generate path) with the packaged tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64,
                                                num_layers=2, num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                                eos_token_id=tokenizer.sep_token_id,
                                                decoder_start_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    made = pseudo_queries(PASSAGES, 6, methods=("generator", "crop"), seed=1,
                          generator=Doc2Query(str(tmp_path / "t5"), seed=1, max_new_tokens=8))
    generated = made[made["method"] == "generator"]
    assert len(generated) >= 1 and all(q.strip() for q in generated["query"])
    again = pseudo_queries(PASSAGES, 6, methods=("generator", "crop"), seed=1,
                           generator=Doc2Query(str(tmp_path / "t5"), seed=1, max_new_tokens=8))
    pd.testing.assert_frame_equal(made, again)
    with pytest.raises(ValueError, match="--generator"):
        Doc2Query(str(tmp_path / "nothing"), seed=1)


@pytest.fixture(scope="module")
def real_set(tmp_path_factory):
    df = read_candidates_json(SHARED / "dl21" / "bm25.json")
    qids = list(dict.fromkeys(df["qid"]))
    keep = df[df["qid"].isin(qids[:2])]
    collection = dict(zip(keep["docid"], keep["passage"]))
    queries = dict(df.drop_duplicates("qid").set_index("qid")["query"].loc[qids[2:14]])
    root = tmp_path_factory.mktemp("augment")
    teacher = str(_tiny_bert_dir(root / "teacher", {"pooling_mode_mean_tokens": True}))
    build_distillation_set(queries, collection, root / "real", k=30, pairs_per_query=8, seed=7,
                           teacher=teacher, teacher_max_length=64, progress=False)
    return root


@needs_shared
def test_an_augmented_set_is_a_distillation_set_of_pseudo_queries(real_set, tmp_path):
    out = tmp_path / "aug"
    stats = build_augmented_set(real_set / "real", out, num_queries=12, seed=5, shared=str(SHARED), progress=False)
    made = pd.read_parquet(out / "pseudo_queries.parquet")
    assert stats["augment"]["made"] == len(made) == 12 and stats["index"] == {"reused": True}
    assert stats["k"] == 30 and stats["pairs_per_query"] == 8 and stats["teacher_max_length"] == 64
    dl20_ids, dl20_texts = evaluation_passages(str(SHARED))
    assert not set(made["docid"]) & dl20_ids  # never a DL20 candidate as a source
    rows = list(TriplesStream(out / "triples.tsv"))
    scores = pd.read_parquet(out / "teacher_scores.parquet")
    assert len(rows) == len(scores) == stats["pairs"] > 0
    assert (scores["teacher_pos"] >= scores["teacher_neg"]).all()
    assert {q for q, *_ in rows} <= set(made["query"])
    with pytest.raises(FileExistsError):  # an existing set is refused, the source never written
        build_augmented_set(real_set / "real", out, num_queries=3, shared=str(SHARED), progress=False)
    with pytest.raises(DataError, match="not a distillation set"):
        build_augmented_set(tmp_path, tmp_path / "x", num_queries=3, shared=str(SHARED), progress=False)


@needs_shared
def test_mixed_sets_keep_rows_and_scores_together(real_set, tmp_path):
    aug = tmp_path / "aug"
    build_augmented_set(real_set / "real", aug, num_queries=12, seed=5, shared=str(SHARED), progress=False)
    sets = [real_set / "real", aug]
    n_aug = len(pd.read_parquet(aug / "teacher_scores.parquet"))
    stats = mix_sets(sets, tmp_path / "mix", take=[20, n_aug], seed=1)
    assert stats["take"] == [20, n_aug] and stats["pairs"] == 20 + n_aug
    mixed = list(TriplesStream(tmp_path / "mix" / "triples.tsv"))
    scores = pd.read_parquet(tmp_path / "mix" / "teacher_scores.parquet")
    origin = pd.read_parquet(tmp_path / "mix" / "mix.parquet")
    sources = [(list(TriplesStream(s / "triples.tsv")), pd.read_parquet(s / "teacher_scores.parquet")) for s in sets]
    for row, (set_, j), pos, neg in zip(mixed, origin.itertuples(index=False), scores["teacher_pos"],
                                        scores["teacher_neg"]):
        assert tuple(row) == tuple(sources[set_][0][j])
        assert np.float32(pos) == sources[set_][1]["teacher_pos"][j] and np.float32(neg) == sources[set_][1]["teacher_neg"][j]
    assert 0 < (origin["set"][: len(origin) // 2] == 0).sum() < len(origin) // 2  # interleaved, not appended
    fused = tmp_path / "fused"
    fuse_distillation_set(real_set / "real", fused, 0.8, pairs_per_query=8, seed=7)
    with pytest.raises(DataError, match="different scales"):
        mix_sets([fused, aug], tmp_path / "bad")
    with pytest.raises(ValueError, match="--take"):
        mix_sets(sets, tmp_path / "bad2", take=[10 ** 6, 1])
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@needs_shared
def test_01_augment_and_mix_command_lines(real_set, tmp_path):
    prefetch = importlib.import_module("01_prefetch_passages")
    prefetch.main(["augment", "--from_set", str(real_set / "real"), "--output_dir", str(tmp_path / "a"),
                   "--num_queries", "6", "--methods", "keywords", "--shared", str(SHARED)])
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["augment"]["per_method"] == {"keywords": 6}
    prefetch.main(["mix", "--sets", str(real_set / "real"), str(tmp_path / "a"), "--output_dir", str(tmp_path / "m")])
    assert (tmp_path / "m" / "triples.tsv").is_file()
    with pytest.raises(SystemExit) as exit_:
        prefetch.main(["augment", "--from_set", str(real_set / "real"), "--output_dir", str(tmp_path / "g"),
                       "--num_queries", "6", "--methods", "generator", "--shared", str(SHARED)])
    assert str(exit_.value.code).startswith("error:") and "--generator" in str(exit_.value.code)
