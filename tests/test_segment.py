"""The segment-cosine head: step 0 is the bi-encoder; it trains, resumes, prunes and reshapes
as any cross-encoder does, and its gates can open cross-segment attention."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.models.encoders import encode
from common.evaluation.cost import fvcore_macs, worst_case_inputs
from common.models.loading import encode_pairs
from common.kinds.loading import load_model, reshape_checkpoint, save_model, score_pairs
from common.pruning.cycles import PruneArgs, PruneCallback
from common.training.schedules import WarmupLinear
from common.models.segment import (SCALE_INIT, cross_attention_mass, encode_segment_pairs,
                            segments_from_ids)
from common.models.structure import zero_dead_weights
from common.training.loop import TrainArgs, Trainer
from conftest import SHARED

FAMILIES = ["bert", "distilbert", "roberta", "electra"]
QUERIES = ["what is entropy", "who wrote hamlet", "what is entropy", "best pizza dough"]
PASSAGES = ["entropy is a measure of disorder in a system and of uncertainty",
            "hamlet is a tragedy by william shakespeare", "bananas are yellow",
            "knead flour water yeast and salt then let it rise overnight"]


def test_step_zero_is_the_bi_encoder_on_real_pairs():
    """The fresh head scores DL20 pairs exactly as the packaged bi-encoder (cosine x scale)."""
    from common.data.formats import read_candidates_json

    cands = read_candidates_json(SHARED / "dl20" / "bm25.json").head(24)
    queries, passages = cands["query"].tolist(), cands["passage"].tolist()
    cross = load_model("all-MiniLM-L6-v2", head="segment_cosine")
    bi = load_model("all-MiniLM-L6-v2", kind="bi")
    ours = score_pairs(cross.model, cross.tokenizer, queries, passages, batch_size=8,
                       max_length=256) / SCALE_INIT
    q = encode(bi.model, bi.tokenizer, queries, max_length=256)
    p = encode(bi.model, bi.tokenizer, passages, max_length=256)
    torch.testing.assert_close(torch.tensor(ours), (q * p).sum(-1), atol=1e-5, rtol=0)
    batch = encode_segment_pairs(cross.tokenizer, queries[:4], passages[:4], 128)
    assert cross_attention_mass(cross.model, dict(batch)) == 0.0


def test_layout_segments_and_positions(tiny_models):
    tok = load_model(str(tiny_models["bert"]), head="segment_cosine").tokenizer
    batch = encode_segment_pairs(tok, ["a b", "c"], ["d e f", "g"], max_length=32)
    ids = batch["input_ids"]
    assert ids[0].tolist()[:4] == [tok.cls_token_id, *tok("a b")["input_ids"][1:-1], tok.sep_token_id]
    segment, positions = segments_from_ids(ids, batch["attention_mask"], tok.sep_token_id)
    assert segment[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert segment[1].tolist()[-3:] == [-1, -1, -1]  # padding
    long = encode_segment_pairs(tok, ["q " * 50], ["p " * 200], max_length=40)["input_ids"][0]
    assert len(long) == 40 and long[-1] == tok.sep_token_id  # the passage is truncated


@pytest.mark.parametrize("family", FAMILIES)
def test_gates_open_cross_attention_and_get_gradients(family, tiny_models):
    loaded = load_model(str(tiny_models[family]), head="segment_cosine")
    model = loaded.model
    batch = dict(encode_pairs(loaded.tokenizer, QUERIES, PASSAGES, 32, model))
    closed = model(**batch).logits
    closed.sum().backward()
    assert model.cross_gate.grad is not None and model.cross_gate.grad.abs().sum() > 0
    with torch.no_grad():
        model.cross_gate.fill_(0.5)
    assert cross_attention_mass(model.eval(), batch) > 0.05
    assert not torch.allclose(model(**batch).logits, closed)


@pytest.mark.parametrize("family", FAMILIES)
def test_reshaped_equals_masked(family, tiny_models, tmp_path):
    loaded = load_model(str(tiny_models[family]), head="segment_cosine")
    model, state = loaded.model.eval(), loaded.state
    with torch.no_grad():
        model.cross_gate.fill_(0.3)  # cross-segment attention open
        model.cls_linear.weight.normal_()
    state.kept_heads[1] = []
    state.kept_heads[2] = [0, 3]
    state.kept_ffn[2] = list(range(0, state.ffn_size, 3))
    loaded.masks.refresh()
    zero_dead_weights(model, state)
    masked = score_pairs(model, loaded.tokenizer, QUERIES, PASSAGES, batch_size=4)
    save_model(model, loaded.tokenizer, state, tmp_path / "masked")
    out, before, after = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    again = load_model(str(out))
    assert after < before and again.state.heads_per_layer == [4, 0, 2]
    assert json.loads((out / "config.json").read_text())["slimrank_head"] == "segment_cosine"
    reshaped = score_pairs(again.model, again.tokenizer, QUERIES, PASSAGES, batch_size=4)
    torch.testing.assert_close(torch.tensor(reshaped), torch.tensor(masked), atol=1e-5, rtol=0)
    one = worst_case_inputs(again.tokenizer, n_pairs=1, max_length=32)
    full = load_model(str(tiny_models[family]), head="segment_cosine").model.eval()
    assert 0 < fvcore_macs(again.model, **one) < fvcore_macs(full, **one)
    # dropping layers keeps one gate per layer
    dropped, _, _ = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "k2"), keep_layers=2)
    assert load_model(str(dropped)).model.cross_gate.shape == (2,)


def _args(model, triples, out, pairs, **kw):
    base = dict(train_triples_file=str(triples), output_dir=str(out), num_training_samples=pairs,
                model_tag=str(model), batch_size=8, max_length=32, learning_rate=5e-4, seed=3,
                head="segment_cosine")
    base.update(kw)
    return TrainArgs(**base)


def test_trains_and_resumes_exactly(tiny_models, toy_triples, tmp_path):
    schedule = lambda t: WarmupLinear(t.total_steps, 2)  # noqa: E731
    straight = Trainer(_args(tiny_models["bert"], toy_triples, tmp_path / "a", 48), "initial",
                       schedule).train()
    first = Trainer(_args(tiny_models["bert"], toy_triples, tmp_path / "b", 48,
                          num_checkpoint_samples=24), "initial", schedule)
    first.total_steps = 3
    half = first.train()
    end = Trainer(_args(tiny_models["bert"], toy_triples, tmp_path / "b", 48,
                        num_checkpoint_samples=24, checkpoint_dir=str(half)), "initial",
                  schedule).train()
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(end / "model.safetensors"))
    assert "cross_gate" in a and a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert load_file(str(half / "model.safetensors"))["cross_gate"].abs().sum() > 0  # it learned
    assert json.loads((end / "config.json").read_text())["slimrank_head"] == "segment_cosine"


def test_prunes_while_distilling_segment_embeddings(tiny_models, toy_triples, tmp_path):
    """03c from a segment checkpoint with activation importance over all layers and embedding
    distillation from the unpruned model; the pruned model reshapes and scores."""
    schedule = lambda t: WarmupLinear(t.total_steps, 1)  # noqa: E731
    initial = Trainer(_args(tiny_models["bert"], toy_triples, tmp_path / "init", 16), "initial",
                      schedule).train()
    prune = PruneArgs(target_heads=8, target_ffn=20, num_prune_cycles=2, score_fraction=0.5,
                      importance="activation", exclude_layers="")
    callback = PruneCallback("mixed", prune)
    trainer = Trainer(_args(None, toy_triples, tmp_path / "mixed", 48, model_tag=None, head=None,
                            checkpoint_dir=str(initial), distill_from=str(initial),
                            distill_target="embeddings", distill_weight=2.0),
                      "mixed", callback.schedule, callback)
    last = trainer.train()
    assert trainer.state.total_heads == 8 and trainer.state.ffn_per_layer == [20, 20, 20]
    lines = [json.loads(x) for x in (tmp_path / "mixed" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["event"] == "train"]
    assert all(x["distill"] > 0 and x["loss"] == pytest.approx(x["task"] + 2.0 * x["distill"], rel=1e-4)
               for x in train)
    out, _, _ = reshape_checkpoint(str(last))
    scores = score_pairs(load_model(str(out)).model, trainer.tokenizer, QUERIES, PASSAGES)
    assert scores.shape == (4,) and torch.isfinite(torch.tensor(scores)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_inference_path_equals_the_training_path(family, tiny_models):
    """No-grad scoring runs the fused kernel; it computes what the differentiable path does,
    with gates shut and open, padding included."""
    loaded = load_model(str(tiny_models[family]), head="segment_cosine")
    model = loaded.model.eval()
    batch = dict(encode_pairs(loaded.tokenizer, QUERIES, PASSAGES, 32, model))
    for gate in (0.0, 0.4):
        with torch.no_grad():
            model.cross_gate.fill_(gate)
            fused = model(**batch).logits
        exact = model(**batch).logits.detach()  # grad enabled: the float32 path
        torch.testing.assert_close(fused, exact, atol=1e-5, rtol=0)
