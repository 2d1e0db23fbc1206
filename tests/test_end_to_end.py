"""End-to-end smoke on the real all-MiniLM-L6-v2 weights: 01 -> 02 -> 03c -> 04 -> 05, tiny sizes."""
from __future__ import annotations

import importlib
import json

import pandas as pd
import pytest
import torch

from common.data.formats import read_candidates
from common.kinds.loading import load_model, score_pairs
from conftest import SHARED

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not found")


def script(name: str):
    return importlib.import_module(name).main


def test_pipeline_on_minilm(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    dl20 = data / "dl20.parquet"
    script("01_prefetch_passages")(["json", "--input", str(SHARED / "dl20/bm25.json"),
                                    "--output", str(dl20), "--run_file", str(data / "dl20.run")])
    script("01_prefetch_passages")(["json", "--input", str(SHARED / "dl21/bm25.json"),
                                    "--output", str(data / "dl21.parquet")])
    with pytest.raises(SystemExit, match="qids in both"):  # train and eval topics must differ
        script("01_prefetch_passages")(["triples", "--candidates", str(dl20), "--qrels",
                                        str(SHARED / "dl20/qrels.txt"), "--eval_candidates", str(dl20),
                                        "--output", str(data / "bad.tsv")])
    triples = data / "triples.tsv"
    script("01_prefetch_passages")(["triples", "--candidates", str(data / "dl21.parquet"), "--qrels",
                                    str(SHARED / "dl21/qrels.txt"), "--eval_candidates", str(dl20),
                                    "--output", str(triples)])
    # a 3-query eval set keeps the smoke fast
    small = read_candidates(dl20)
    small = small[small["qid"].isin(small["qid"].unique()[:3])]
    small.to_parquet(data / "dl20.small.parquet")
    common = ["--train_triples_file", str(triples), "--max_length", "64", "--batch_size", "8",
              "--eval_candidates_file", str(data / "dl20.small.parquet"),
              "--eval_qrels_file", str(SHARED / "dl20/qrels.txt"), "--threads", "2"]
    script("02_train_initial")(["--model_tag", "all-MiniLM-L6-v2", "--output_dir", str(runs / "initial"),
                                "--num_training_samples", "24", "--num_checkpoint_samples", "24",
                                "--learning_rate", "2e-5", *common])
    initial = runs / "initial" / "seen_000000024"
    assert json.loads((initial / "trainer_state.json").read_text())["metrics"][0]["ndcg@10"] >= 0
    script("03c_prune_mixed")(["initial", "--checkpoint_dir", str(initial), "--output_dir",
                               str(runs / "mixed"), "--num_training_samples", "24",
                               "--num_prune_cycles", "2", "--target_heads", "68", "--target_ffn", "1400",
                               *common])
    (pruned,) = list((runs / "mixed").glob("seen_*"))
    assert pruned.name == "seen_000000048_heads_068_ffn_08536"
    script("04_reshape")(["--checkpoint_dir", str(pruned)])

    # the reshaped real model scores real candidate pairs as the masked one does
    masked, reshaped = load_model(str(pruned)), load_model(str(pruned / "reshaped"))
    pairs = small.head(40)
    a = score_pairs(masked.model, masked.tokenizer, pairs["query"].tolist(), pairs["passage"].tolist())
    b = score_pairs(reshaped.model, reshaped.tokenizer, pairs["query"].tolist(), pairs["passage"].tolist())
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in reshaped.model.parameters()) < 22_713_986

    results = runs / "results.parquet"
    common_eval = ["--candidates", str(data / "dl20.small.parquet"), "--qrels",
                   str(SHARED / "dl20/qrels.txt"), "--topics", "dl20", "--results", str(results),
                   "--table", str(runs / "results.md"), "--max_length", "64"]
    script("05_eval_trec")(["--first_stage", "bm25", *common_eval])
    script("05_eval_trec")(["--checkpoint", str(initial), str(pruned / "reshaped"), *common_eval,
                            "--repeats", "1", "--warmup", "0", "--latency_queries", "1"])
    table = pd.read_parquet(results)
    assert len(table) == 3
    row = table[table["checkpoint"] == str(pruned / "reshaped")].iloc[0]
    base = table[table["checkpoint"] == str(initial)].iloc[0]
    assert row["heads"] == 68 and row["flops_macs"] < base["flops_macs"]
    assert row["cpu_ms_real"] > 0 and (pruned / "reshaped" / "eval" / "dl20.run").exists()
    assert "DL20 NDCG@10" in (runs / "results.md").read_text()

    # quality only (--no_costs) still runs on the requested threads; no cost columns are filled
    before = torch.get_num_threads()
    try:
        own = {"--results": str(runs / "quality.parquet"), "--table": str(runs / "quality.md")}
        quality_eval = [own.get(common_eval[i - 1], a) if i else a for i, a in enumerate(common_eval)]
        script("05_eval_trec")(["--checkpoint", str(initial), *quality_eval, "--no_costs", "--threads", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    quality = pd.read_parquet(runs / "quality.parquet").iloc[0]
    assert quality["ndcg@10"] == pytest.approx(base["ndcg@10"], abs=1e-9)
    assert "cpu_ms_real" not in quality or pd.isna(quality["cpu_ms_real"])
