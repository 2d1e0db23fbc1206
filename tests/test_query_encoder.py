"""Asymmetric bi-encoders (--query_encoder): a frozen encoder embeds the queries, the model only
the passages; the choice travels in the model's config through training, pruning, reshaping,
the ranking API and 05's rows and costs."""
from __future__ import annotations

import importlib
import json
import shutil
from itertools import islice

import numpy as np
import pandas as pd
import pytest
import torch

from common.data.formats import TriplesStream
from common.kinds import BiKind
from common.pruning.l3prune import layerwise_losses
from common.kinds.loading import load_model, reshape_checkpoint, save_model
from common.serving.rank import QUERY_ENCODER_FIELD, Ranker, check_query_encoder
from common.training.schedules import WarmupLinear
from common.training.loop import TrainArgs, Trainer, apply_loss
from common.training.losses import get_loss

QUERIES = ["what is a cat", "how tall is everest", "what is a cat"]
PASSAGES = ["a cat is a small animal with fur", "mount everest is 8849 metres tall", "the stock market fell"]


def _disturbed_student(tiny_models, out, query_encoder=None):
    """The tiny bert bi-encoder with noise on its layers (so it differs from its teacher); with
    ``query_encoder`` that model kept inside it as ``query_encoder/`` (what training writes)."""
    loaded = load_model(str(tiny_models["bert"]), kind="bi")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "encoder.layer" in name and p.ndim == 2:
                p.add_(0.2 * torch.randn_like(p))
    if query_encoder:
        setattr(loaded.model.config, QUERY_ENCODER_FIELD, "query_encoder")
    save_model(loaded.model, loaded.tokenizer, loaded.state, out)
    if query_encoder:
        encoder = load_model(str(query_encoder), kind="bi")
        save_model(encoder.model, encoder.tokenizer, encoder.state, out / "query_encoder")
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
    assert ranker.query_encoder == str(named / "query_encoder")
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
    assert config[QUERY_ENCODER_FIELD] == "query_encoder"  # kept inside the checkpoint
    assert (final / "query_encoder" / "config.json").is_file()
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    distill = [m["distill"] for m in metrics if m.get("event") == "train"]
    assert distill[-1] < distill[0], distill
    after = Ranker.load(str(final)).score(QUERIES, PASSAGES)
    reference = _cosines(teacher, teacher)  # what the unpruned pair scores
    assert np.abs(after - reference).mean() < np.abs(before - reference).mean()


def test_the_query_encoder_survives_pruning_and_reshaping(tiny_models, toy_triples, tmp_path):
    """A stage from a checkpoint that names a query encoder keeps it without the flag (03c
    prunes under it, its checkpoints keep it inside), the reshaped dir keeps it, and another
    encoder is refused."""
    prune = importlib.import_module("03c_prune_mixed").main
    teacher = str(tiny_models["bert"])
    student = _disturbed_student(tiny_models, tmp_path / "student", query_encoder=teacher)
    prune(["initial", "--checkpoint_dir", str(student), "--output_dir", str(tmp_path / "prune"),
           "--train_triples_file", str(toy_triples), "--num_training_samples", "16", "--batch_size", "8",
           "--max_length", "32", "--num_prune_cycles", "1", "--target_heads", "4", "--target_ffn", "32",
           "--distill_from", teacher, "--distill_target", "embeddings", "--contrastive_weight", "0",
           "--importance", "activation", "--exclude_layers", "", "--threads", "1"])
    (pruned,) = list((tmp_path / "prune").glob("seen_*"))
    assert (pruned / "query_encoder" / "config.json").is_file()
    out, _, _ = reshape_checkpoint(str(pruned))
    assert json.loads((out / "config.json").read_text())[QUERY_ENCODER_FIELD] == "query_encoder"
    assert (out / "query_encoder" / "config.json").is_file()
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


def test_a_query_encoder_that_cannot_meet_the_passages_is_refused(tiny_models, toy_triples, tmp_path):
    """Training embeds the queries with the student's tokenizer and pooling, scoring with the
    encoder's own: another vocabulary, pooling or width is refused up front (trainer and ranker),
    and so is an encoder that names a query encoder of its own (a chain)."""
    teacher = str(tiny_models["bert"])
    student = load_model(teacher, kind="bi")
    check_query_encoder(student, load_model(teacher, kind="bi"), teacher)  # the same model: fine
    cases = {"dimensions": lambda m: setattr(m.model.config, "hidden_size", 48),
             "pools by": lambda m: setattr(m.model.config, "slimrank_pooling", "cls"),
             "tokenizer vocabulary": lambda m: m.tokenizer.add_tokens(["zzqqxx"]),
             "names a query encoder of its own": lambda m: setattr(m.model.config, QUERY_ENCODER_FIELD, teacher)}
    for message, change in cases.items():
        encoder = load_model(teacher, kind="bi")
        change(encoder)
        with pytest.raises(ValueError, match=message):
            check_query_encoder(student, encoder, "x")
    cls_pooled = load_model(teacher, kind="bi")  # the same refusal from a saved dir, in both places
    setattr(cls_pooled.model.config, "slimrank_pooling", "cls")
    save_model(cls_pooled.model, cls_pooled.tokenizer, cls_pooled.state, tmp_path / "cls")
    with pytest.raises(ValueError, match="pools by 'cls'"):
        Ranker.from_loaded(load_model(teacher, kind="bi"), query_encoder=str(tmp_path / "cls"))
    with pytest.raises(ValueError, match="pools by 'cls'"):
        Trainer(_args(_disturbed_student(tiny_models, tmp_path / "student"), tmp_path / "run", tiny_models,
                      toy_triples, query_encoder=str(tmp_path / "cls")),
                "initial", lambda t: WarmupLinear(t.total_steps, 1))


def test_local_query_encoders_travel_with_the_checkpoint(tiny_models, toy_triples, tmp_path, monkeypatch):
    """A local --query_encoder (here relative to the working directory) is saved inside every
    checkpoint and named relatively: the run dir moved elsewhere, the original encoder gone, the
    checkpoint still finds it; the same encoder named again is not a conflict; reshaping keeps it."""
    teacher = load_model(str(tiny_models["bert"]), kind="bi")
    save_model(teacher.model, teacher.tokenizer, teacher.state, tmp_path / "encoders" / "q")
    student = _disturbed_student(tiny_models, tmp_path / "student")
    monkeypatch.chdir(tmp_path / "encoders")
    final = Trainer(_args(student, tmp_path / "run", tiny_models, toy_triples, query_encoder="q"),
                    "initial", lambda t: WarmupLinear(t.total_steps, 1)).train()
    assert json.loads((final / "config.json").read_text())[QUERY_ENCODER_FIELD] == "query_encoder"
    Trainer(_args(final, tmp_path / "again", tiny_models, toy_triples, query_encoder="q"),
            "recover", lambda t: WarmupLinear(t.total_steps, 1))  # the same encoder: accepted
    monkeypatch.chdir(tmp_path)
    expected = _cosines(tmp_path / "encoders" / "q", final)
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    shutil.rmtree(tmp_path / "encoders")
    moved = tmp_path / "moved" / final.name
    np.testing.assert_allclose(Ranker.load(str(moved)).score(QUERIES, PASSAGES), expected, atol=1e-5)
    out, _, _ = reshape_checkpoint(str(moved), str(tmp_path / "reshaped"))
    assert (out / "query_encoder" / "config.json").is_file()
    np.testing.assert_allclose(Ranker.load(str(out)).score(QUERIES, PASSAGES), expected, atol=1e-5)


def test_eval_sweeps_know_the_asymmetric_rows(tiny_models, toy_triples, tmp_path):
    """05 --all_checkpoints --query_encoder scores a checkpoint that has only a symmetric row and
    skips one that has its asymmetric row; --query_encoder with --first_stage or empty is refused."""
    evaluate = importlib.import_module("05_eval_trec").main
    teacher = str(tiny_models["bert"])
    Trainer(_args(_disturbed_student(tiny_models, tmp_path / "student"), tmp_path / "run", tiny_models,
                  toy_triples, num_checkpoint_samples=32), "initial", lambda t: WarmupLinear(t.total_steps, 1)).train()
    rows = [{"qid": q, "query": f"query {q}", "docid": f"d{q}{i}", "rank": i + 1, "first_stage_score": 10.0 - i,
             "passage": f"passage {i} about topic {q}"} for q in ("1", "2") for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "qrels.txt").write_text("".join(f"{q} 0 d{q}{i} {i % 3}\n" for q in ("1", "2") for i in range(3)))
    common = ["--candidates", str(tmp_path / "c.parquet"), "--qrels", str(tmp_path / "qrels.txt"),
              "--topics", "toy", "--results", str(tmp_path / "r.parquet"), "--table", str(tmp_path / "r.md"),
              "--max_length", "32", "--no_costs", "--threads", "1", "--all_checkpoints", str(tmp_path / "run")]
    evaluate(common)
    evaluate([*common, "--query_encoder", teacher])
    evaluate([*common, "--query_encoder", teacher])  # nothing new to score
    keys = pd.read_parquet(tmp_path / "r.parquet")["checkpoint"].tolist()
    assert len(keys) == 2 and len(set(keys)) == 2 and sum(k.endswith(f"+queries:{teacher}") for k in keys) == 1
    for bad in (["--first_stage", "bm25", "--query_encoder", teacher], ["--checkpoint", teacher, "--query_encoder", " "]):
        with pytest.raises(SystemExit):
            evaluate(["--candidates", str(tmp_path / "c.parquet"), "--qrels", str(tmp_path / "qrels.txt"),
                      "--topics", "toy", "--results", str(tmp_path / "bad.parquet"), *bad])
    assert not (tmp_path / "bad.parquet").exists()


def test_l3prune_scores_an_asymmetric_model_with_its_query_encoder(tiny_models, toy_triples, tmp_path):
    """The layerwise losses of a model that names a query encoder are its queries' (the encoder's
    embeddings against each cut of the passage encoder), not the symmetric model's."""
    teacher = str(tiny_models["bert"])
    named = _disturbed_student(tiny_models, tmp_path / "named", query_encoder=teacher)
    plain = _disturbed_student(tiny_models, tmp_path / "plain")
    asym = layerwise_losses(load_model(str(named)), str(toy_triples), rows=16, max_length=32)
    sym = layerwise_losses(load_model(str(plain)), str(toy_triples), rows=16, max_length=32)
    assert len(asym) == len(sym) == 3 and np.abs(np.subtract(asym, sym)).max() > 1e-4
    # the same numbers by hand for the full depth: the teacher's queries, the student's passages
    student = load_model(str(plain))
    kind = BiKind(student.model.eval(), student.tokenizer, torch.device("cpu"), 32, "fp32")
    kind.query_encoder = load_model(teacher, kind="bi").model.eval()
    rows = list(islice(iter(TriplesStream(str(toy_triples))), 16))
    name, options = kind.label_loss(TrainArgs, kind.model)
    loss = get_loss(name, **options)
    with torch.no_grad():
        by_hand = float(apply_loss(loss, kind.forward(kind.model, rows, loss.inputs).inputs))
    assert abs(asym[-1] - by_hand) < 1e-5


def test_an_evaluation_loads_the_query_encoder_once(tiny_models, tmp_path, monkeypatch):
    """Scoring, both latency regimes and the bf16 timing of one 05 row share one query encoder
    (loaded from disk once per process, not once per Ranker)."""
    from common.serving import rank
    evaluate = importlib.import_module("05_eval_trec").main
    teacher = str(tiny_models["bert"])
    student, _, _ = reshape_checkpoint(teacher, str(tmp_path / "two"), keep_layers=2, kind="bi")
    rows = [{"qid": q, "query": f"query {q}", "docid": f"d{q}{i}", "rank": i + 1, "first_stage_score": 10.0 - i,
             "passage": f"passage {i} about topic {q}"} for q in ("1", "2") for i in range(3)]
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "qrels.txt").write_text("".join(f"{q} 0 d{q}{i} {i % 3}\n" for q in ("1", "2") for i in range(3)))
    loads = []
    real_load = rank.load_model
    monkeypatch.setattr(rank, "load_model", lambda path, *a, **k: loads.append(str(path)) or real_load(path, *a, **k))
    rank._query_encoder.cache_clear()
    evaluate(["--checkpoint", str(student), "--query_encoder", teacher, "--candidates", str(tmp_path / "c.parquet"),
              "--qrels", str(tmp_path / "qrels.txt"), "--topics", "toy", "--results", str(tmp_path / "r.parquet"),
              "--max_length", "32", "--threads", "1", "--repeats", "1", "--latency_queries", "1", "--bf16_latency"])
    assert loads.count(str(tiny_models["bert"].resolve())) == 1
    assert len(pd.read_parquet(tmp_path / "r.parquet")) == 1
