"""Asymmetric bi-encoders (--query_encoder): a frozen encoder embeds the queries, the model only
the passages; the choice travels in the model's config through training, pruning, reshaping,
the ranking API and 05's rows and costs."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from common.kinds import BiKind
from common.modeling import load_model, reshape_checkpoint, save_model
from common.rank import QUERY_ENCODER_FIELD, Ranker
from common.schedules import WarmupLinear
from common.trainer import TrainArgs, Trainer

QUERIES = ["what is a cat", "how tall is everest", "what is a cat"]
PASSAGES = ["a cat is a small animal with fur", "mount everest is 8849 metres tall", "the stock market fell"]


def _disturbed_student(tiny_models, out, query_encoder=None):
    """The tiny bert bi-encoder with noise on its layers (so it differs from its teacher)."""
    loaded = load_model(str(tiny_models["bert"]), kind="bi")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "encoder.layer" in name and p.ndim == 2:
                p.add_(0.2 * torch.randn_like(p))
    if query_encoder:
        setattr(loaded.model.config, QUERY_ENCODER_FIELD, query_encoder)
    save_model(loaded.model, loaded.tokenizer, loaded.state, out)
    return out


def _cosines(query_model, passage_model):
    q = Ranker.load(str(query_model), kind="bi").encode(QUERIES)
    p = Ranker.load(str(passage_model), kind="bi").encode(PASSAGES)
    return (q * p).sum(-1)


def test_the_ranker_embeds_queries_with_the_named_encoder(tiny_models, tmp_path):
    teacher = tiny_models["bert"]
    named = _disturbed_student(tiny_models, tmp_path / "named", query_encoder=str(teacher))
    plain = _disturbed_student(tiny_models, tmp_path / "plain")
    expected = _cosines(teacher, plain)  # teacher queries x student passages
    symmetric = Ranker.load(str(plain)).score(QUERIES, PASSAGES)
    assert np.abs(expected - symmetric).max() > 1e-3  # the two encoders differ
    ranker = Ranker.load(str(named))
    assert ranker.query_encoder == str(teacher)
    np.testing.assert_allclose(ranker.score(QUERIES, PASSAGES), expected, atol=1e-5)
    # an override on a model trained without one, and the same under bf16 for both sides
    override = Ranker.from_loaded(load_model(str(plain)), "torch", query_encoder=str(teacher))
    np.testing.assert_allclose(override.score(QUERIES, PASSAGES), expected, atol=1e-5)
    bf16 = Ranker.load(str(named), "torch-bf16")
    assert bf16.query_ranker.backend == "torch-bf16"
    np.testing.assert_allclose(bf16.score(QUERIES, PASSAGES), expected, atol=3e-2)
    # a relative name resolves inside the model dir first (a self-contained dir)
    save_model(*(lambda m: (m.model, m.tokenizer, m.state))(load_model(str(teacher), kind="bi")),
               plain / "query_encoder")
    inside = load_model(str(plain))
    setattr(inside.model.config, QUERY_ENCODER_FIELD, "query_encoder")
    np.testing.assert_allclose(Ranker.from_loaded(inside).score(QUERIES, PASSAGES), expected, atol=1e-5)
    with pytest.raises(ValueError, match="a query encoder is for bi-encoders"):
        Ranker.from_loaded(load_model(str(teacher)), query_encoder=str(teacher))


def _args(student, out, tiny_models, toy_triples, **kw):
    base = {"train_triples_file": str(toy_triples), "output_dir": str(out), "num_training_samples": 32,
            "num_checkpoint_samples": 16, "checkpoint_dir": str(student), "batch_size": 8,
            "max_length": 32, "learning_rate": 2e-3, "seed": 3, "distill_from": str(tiny_models["bert"]),
            "distill_target": "embeddings", "contrastive_weight": 0.0}
    base.update(kw)
    return TrainArgs(**base)


def test_training_with_a_query_encoder_trains_passages_only(tiny_models, toy_triples, tmp_path):
    """The student's forward embeds passages only (the queries come from the frozen encoder, no
    gradient), embedding distillation compares passages only, the checkpoints name the query
    encoder, and the distillation pulls the student's passages toward the teacher's."""
    teacher = str(tiny_models["bert"])
    student = _disturbed_student(tiny_models, tmp_path / "student")
    trainer = Trainer(_args(student, tmp_path / "run", tiny_models, toy_triples, query_encoder=teacher),
                      "initial", lambda t: WarmupLinear(t.total_steps, 1))
    kind = trainer.training_kind
    assert isinstance(kind, BiKind) and kind.query_encoder is not None
    assert not any(p.requires_grad for p in kind.query_encoder.parameters())
    rows = [("what is a cat", "a cat is a small animal", "the stock market fell")] * 2
    seen = []
    handle = trainer.model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[0]),
                                                     with_kwargs=True)
    forward = kind.forward(trainer.model, rows, ("scores",))
    handle.remove()
    assert seen == [4]  # one student call: the 2 x 2 passages, no queries
    assert not forward.inputs["query_embeddings"].requires_grad
    assert forward.inputs["passage_embeddings"].requires_grad
    with torch.no_grad():
        teacher_out = kind.teacher_forward(trainer.teacher, rows, forward)
    students, teachers = kind.distill_inputs(forward, teacher_out, "embeddings")
    assert len(students) == 1 and students[0].shape == (4, students[0].shape[1])

    before = _cosines(teacher, student)
    final = trainer.train()
    config = json.loads((final / "config.json").read_text())
    assert config[QUERY_ENCODER_FIELD] == teacher
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distill = [m["distill"] for m in metrics if m.get("event") == "train"]
    assert distill[-1] < distill[0], distill
    after = Ranker.load(str(final)).score(QUERIES, PASSAGES)
    reference = _cosines(teacher, teacher)  # what the unpruned pair scores
    assert np.abs(after - reference).mean() < np.abs(before - reference).mean()


def test_the_query_encoder_survives_pruning_and_reshaping(tiny_models, toy_triples, tmp_path):
    """A stage from a checkpoint that names a query encoder keeps it without the flag (03c
    prunes under it), the reshaped dir names it, and another name is refused."""
    prune = importlib.import_module("03c_prune_mixed").main
    teacher = str(tiny_models["bert"])
    student = _disturbed_student(tiny_models, tmp_path / "student", query_encoder=teacher)
    prune(["initial", "--checkpoint_dir", str(student), "--output_dir", str(tmp_path / "prune"),
           "--train_triples_file", str(toy_triples), "--num_training_samples", "16", "--batch_size", "8",
           "--max_length", "32", "--num_prune_cycles", "1", "--target_heads", "4", "--target_ffn", "32",
           "--distill_from", teacher, "--distill_target", "embeddings", "--contrastive_weight", "0",
           "--importance", "activation", "--exclude_layers", "", "--threads", "1"])
    (pruned,) = list((tmp_path / "prune").glob("seen_*"))
    out, _, _ = reshape_checkpoint(str(pruned))
    assert json.loads((out / "config.json").read_text())[QUERY_ENCODER_FIELD] == teacher
    reshaped = Ranker.load(str(out))
    np.testing.assert_allclose(reshaped.score(QUERIES, PASSAGES), _cosines(teacher, out), atol=1e-5)
    other = _disturbed_student(tiny_models, tmp_path / "other")
    with pytest.raises(ValueError, match="a model keeps its query encoder"):
        Trainer(_args(out, tmp_path / "again", tiny_models, toy_triples, query_encoder=str(other)),
                "recover", lambda t: WarmupLinear(t.total_steps, 1))


def test_query_encoder_arguments_are_checked(tiny_models, toy_triples, tmp_path):
    teacher = str(tiny_models["bert"])
    with pytest.raises(ValueError, match="--query_encoder is for bi-encoders"):
        Trainer(TrainArgs(train_triples_file=str(toy_triples), output_dir=str(tmp_path / "c"),
                          num_training_samples=16, model_tag=teacher, batch_size=8, max_length=32,
                          query_encoder=teacher), "initial", lambda t: WarmupLinear(t.total_steps, 1))
    args = _args(teacher, tmp_path / "h", tiny_models, toy_triples, query_encoder=teacher, distill_hidden=1.0)
    with pytest.raises(ValueError, match="with --query_encoder the student sees passages only"):
        args.validate()
    with pytest.raises(ValueError, match="--query_encoder must name a model"):
        _args(teacher, tmp_path / "e", tiny_models, toy_triples, query_encoder=" ").validate()


def test_eval_rows_say_which_encoder_embedded_the_queries(tiny_models, tmp_path):
    """05 --query_encoder: its own row (key +queries:<name>), the query encoder in the run name,
    its MACs counted for the query's sequence."""
    evaluate = importlib.import_module("05_eval_trec").main
    teacher = str(tiny_models["bert"])
    student, _, _ = reshape_checkpoint(teacher, str(tmp_path / "two"), keep_layers=2, kind="bi")
    rows = [{"qid": q, "query": f"query {q}", "docid": f"d{q}{i}", "rank": i + 1, "first_stage_score": 10.0 - i,
             "passage": f"passage {i} about topic {q} " * (i + 1)} for q in ("1", "2") for i in range(4)]
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "qrels.txt").write_text("".join(f"{q} 0 d{q}{i} {i % 3}\n" for q in ("1", "2") for i in range(4)))
    common = ["--candidates", str(tmp_path / "c.parquet"), "--qrels", str(tmp_path / "qrels.txt"),
              "--topics", "toy", "--results", str(tmp_path / "r.parquet"), "--table", str(tmp_path / "r.md"),
              "--max_length", "32", "--no_latency", "--threads", "1"]
    evaluate(["--checkpoint", str(student), *common])
    evaluate(["--checkpoint", str(student), "--query_encoder", teacher, *common])
    table = pd.read_parquet(tmp_path / "r.parquet")
    assert len(table) == 2
    plain = table[table["checkpoint"] == str(student)].iloc[0]
    asym = table[table["checkpoint"] == f"{student}+queries:{teacher}"].iloc[0]
    assert asym["query_encoder"] == teacher and f"[queries: {teacher}]" in asym["run"]
    query_macs, per_sequence = asym["query_encoder_macs_per_sequence"], plain["macs_per_sequence"]
    assert query_macs > per_sequence  # the query encoder keeps all its layers
    assert asym["flops_macs"] - plain["flops_macs"] == query_macs - per_sequence
    assert f"[queries: {teacher}]" in (tmp_path / "r.md").read_text()
