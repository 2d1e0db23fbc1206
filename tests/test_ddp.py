"""DistributedDataParallel on CPU with gloo and 2 processes, against one process."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common.models.loading import resolve_model_path
from common.kinds.loading import load_model
from common.pruning.cycles import PruneArgs, PruneCallback
from common.training.schedules import WarmupLinear
from common.training.loop import TrainArgs, Trainer


def no_dropout_model(directory: Path) -> Path:
    """Dropout off, so that 2 ranks x B and 1 process x 2B see the same function."""
    from conftest import tiny_config

    cfg = tiny_config("bert")
    cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2")).save_pretrained(directory)
    return directory


def make_trainer(kind: str, model: str, triples: str, out: str, pairs: int, model_kind: str = "cross") -> Trainer:
    """``model_kind`` bi: distilled to the unpruned model's embeddings (03c's bi-encoder recipe);
    bi-contrastive: the in-batch contrastive loss (02's bi-encoder training)."""
    bi = dict(model_kind="bi", distill_from=model, distill_target="embeddings", contrastive_weight=0.0) \
        if model_kind == "bi" else dict(model_kind="bi") if model_kind == "bi-contrastive" else {}
    args = TrainArgs(train_triples_file=triples, output_dir=out, num_training_samples=pairs,
                     model_tag=model, batch_size=16, max_length=32, learning_rate=1e-3, seed=1,
                     threads=1, head="segment_cosine" if kind.startswith("segment") else None, **bi)
    if kind == "initial":
        return Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))
    if kind == "l0":
        from common.pruning.l0 import L0Args, L0Callback

        callback = L0Callback(L0Args(target_macs_ratio=0.5, l0_learning_rate=0.2))
        return Trainer(args, "l0", callback.schedule, callback)
    if kind == "latency":  # 03c to a predicted-time target, the table written beside the triples
        callback = PruneCallback("mixed", PruneArgs(target_latency_ratio=0.5, latency_table=str(
            Path(triples).with_name("latency.json")), num_prune_cycles=2, score_fraction=1.0, allow_empty_layers=True))
        return Trainer(args, "mixed", callback.schedule, callback)
    callback = PruneCallback("heads", PruneArgs(target_sparsity=0.25, score_fraction=1.0))
    return Trainer(args, "heads", callback.schedule, callback)


def _worker(rank: int, world: int, port: int, kind: str, model: str, triples: str, out: str,
            pairs: int, model_kind: str = "cross") -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        make_trainer(kind, model, triples, out, pairs, model_kind).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(no_dropout_model(tmp_path_factory.mktemp("nodrop") / "m"))


@pytest.mark.parametrize("kind,pairs", [("initial", 16), ("heads", 48), ("segment_heads", 48), ("l0", 48),
                                        ("latency", 48)])
def test_two_ranks_equal_one_process(kind, pairs, model_dir, tmp_path):
    from conftest import write_toy_triples
    from test_latency_prune import write_table

    triples = str(write_toy_triples(tmp_path / "t.tsv"))
    write_table(tmp_path / "latency.json")
    single = make_trainer(kind, model_dir, triples, str(tmp_path / "single"), pairs)
    single_end = single.train()
    mp.spawn(_worker, args=(2, free_port(), kind, model_dir, triples, str(tmp_path / "ddp"), pairs),
             nprocs=2, join=True)
    ddp_end = tmp_path / "ddp" / single_end.name
    assert ddp_end.is_dir(), sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert (ddp_end / "rng.pt").exists() and (ddp_end / "rng_rank1.pt").exists()
    a, b = load_file(str(single_end / "model.safetensors")), load_file(str(ddp_end / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    if kind.endswith("heads"):
        ha = json.loads((single_end / "pruning.json").read_text())["history"]
        hb = json.loads((ddp_end / "pruning.json").read_text())["history"]
        assert len(ha) == 2
        assert [[(h["layer"], h["head"]) for h in e["heads"]] for e in ha] == \
               [[(h["layer"], h["head"]) for h in e["heads"]] for e in hb]
        assert [e["scored_pairs"] for e in ha] == [e["scored_pairs"] for e in hb]
    if kind == "latency":  # the summed head scores choose the same shape and the same heads
        pa = json.loads((single_end / "pruning.json").read_text())
        pb = json.loads((ddp_end / "pruning.json").read_text())
        sa, sb = pa["history"][0]["latency_shape"], pb["history"][0]["latency_shape"]
        assert (sa["heads_per_layer"], sa["ffn_per_layer"]) == (sb["heads_per_layer"], sb["ffn_per_layer"])
        assert sa["predicted_ratio"] <= 0.5 and any(e.get("heads") for e in pa["history"])
        assert pa["kept_heads"] == pb["kept_heads"] and pa["kept_ffn"] == pb["kept_ffn"]
        assert [e["scored_pairs"] for e in pa["history"]] == [e["scored_pairs"] for e in pb["history"]]
    if kind == "l0":  # the same gates on every rank: the same learned structure
        pa = json.loads((single_end / "pruning.json").read_text())
        pb = json.loads((ddp_end / "pruning.json").read_text())
        assert pa["history"][-1]["l0"]["macs_ratio"] <= 0.5
        assert pa["kept_heads"] == pb["kept_heads"] and pa["kept_ffn"] == pb["kept_ffn"]


@pytest.mark.parametrize("family,model_kind,kind", [("xlm-roberta", "cross1", "heads"), ("xlm-roberta", "bi", "l0"),
                                                    ("modernbert", "cross1", "l0"), ("modernbert", "bi", "heads"),
                                                    ("xlm-roberta", "bi-contrastive", "initial")])
def test_two_ranks_equal_one_process_on_byo_families(family, model_kind, kind, tmp_path):
    """XLM-RoBERTa and ModernBERT (tests/test_byo.py's models: a trained 1-label CrossEncoder
    dir, a SentenceTransformer dir with its pooling, Dense and prompts), dropout off: a prune
    stage on 2 gloo ranks gives the weights, the scores and the structure of 1 process; and a
    bi-encoder's in-batch contrastive training, whose negatives are the global batch's.

    Initializer range 0.2: at 0.02 a random-init model under a listwise loss has gradients near
    AdamW's eps (1e-8), where rounding (one sum vs two) decides the size of a step. Attention
    key biases are compared by their effect (the scores), not their values: softmax over keys
    is invariant to them, so their gradient is rounding noise, which AdamW turns into steps."""
    from conftest import write_toy_triples
    from test_byo import build, scores

    model = str(build(family, model_kind.split("-")[0], tmp_path / "m", dropout=0.0, initializer_range=0.2))
    model_kind = model_kind if model_kind.startswith("bi") else "cross"
    triples = str(write_toy_triples(tmp_path / "t.tsv"))
    single_end = make_trainer(kind, model, triples, str(tmp_path / "single"), 48, model_kind).train()
    mp.spawn(_worker, args=(2, free_port(), kind, model, triples, str(tmp_path / "ddp"), 48, model_kind),
             nprocs=2, join=True)
    ddp_end = tmp_path / "ddp" / single_end.name
    a, b = load_file(str(single_end / "model.safetensors")), load_file(str(ddp_end / "model.safetensors"))
    start = load_file(str(Path(model) / "model.safetensors"))
    assert a.keys() == b.keys()
    # the contrastive loss's logits are dot products / 0.02: its rounding is 50 x larger (without
    # the global batch's negatives the weights differ by 5e-3)
    atol = 5e-5 if model_kind == "bi-contrastive" else 1e-5
    for key in a:
        if not key.endswith("attention.self.key.bias"):
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)
    assert sum(not torch.equal(a[k], start[k]) for k in a) > len(a) // 2  # it trained
    np.testing.assert_allclose(scores(load_model(str(ddp_end))), scores(load_model(str(single_end))), atol=atol)
    pa = json.loads((single_end / "pruning.json").read_text())
    pb = json.loads((ddp_end / "pruning.json").read_text())
    assert pa["kept_heads"] == pb["kept_heads"] and pa["kept_ffn"] == pb["kept_ffn"]
    assert kind == "initial" or sum(map(len, pa["kept_heads"])) < 12  # the stage pruned
    if model_kind == "cross":  # a 1-label head under a listwise loss: its bias has no gradient, and is kept
        bias = [k for k in a if k.startswith("classifier") and k.endswith("bias") and a[k].numel() == 1]
        assert len(bias) == 1 and torch.equal(a[bias[0]], start[bias[0]])


def _resume_worker(rank: int, world: int, port: int, model: str, triples: str, out: str,
                   checkpoint_dir: str | None, stop: int | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        args = TrainArgs(train_triples_file=triples, output_dir=out, num_training_samples=48,
                         num_checkpoint_samples=16, model_tag=model, checkpoint_dir=checkpoint_dir,
                         batch_size=16, max_length=32, learning_rate=1e-3, seed=1, threads=1)
        trainer = Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))
        if stop:
            trainer.total_steps = stop
        trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_resume_under_ddp_equals_straight_run(tiny_models, tmp_path):
    """Dropout on: every rank restores its own RNG stream, so resume is exact under DDP too."""
    from conftest import write_toy_triples

    triples, model = str(write_toy_triples(tmp_path / "t.tsv")), str(tiny_models["bert"])
    spawn = lambda out, ckpt, stop: mp.spawn(  # noqa: E731
        _resume_worker, args=(2, free_port(), model, triples, str(out), ckpt, stop), nprocs=2, join=True)
    spawn(tmp_path / "a", None, None)
    spawn(tmp_path / "b", None, 1)
    spawn(tmp_path / "b", str(tmp_path / "b" / "seen_000000016"), None)
    a = load_file(str(tmp_path / "a" / "seen_000000048" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "seen_000000048" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
