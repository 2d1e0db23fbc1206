"""Layer-wise hidden-state distillation (--distill_hidden): the recorded layer outputs are the
model's hidden states, padding is left out, and training with it pulls a student's layers
toward its teacher's."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from common.training.hidden import LayerOutputs, hidden_mse
from common.models.loading import encode_pairs
from common.kinds.loading import load_model, save_model
from common.training.schedules import WarmupLinear
from common.training.loop import TrainArgs, Trainer

TEXTS = ["what is a cat", "mount everest is 8849 metres tall, the highest mountain above sea level"]


def _batch(loaded):
    return loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")


def _manual(student, teacher, batch) -> float:
    """The same measure from transformers' own hidden states (entry i + 1 = layer i's output)."""
    with torch.no_grad():
        hs = student(**batch, output_hidden_states=True).hidden_states[1:]
        ht = teacher(**batch, output_hidden_states=True).hidden_states[1:]
    mask = batch["attention_mask"].float()[..., None]
    per_layer = [((s - t).pow(2) * mask).sum() / (mask.sum() * s.shape[-1]) for s, t in zip(hs, ht)]
    return float(sum(per_layer) / len(per_layer))


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_layer_outputs_are_the_hidden_states_and_padding_is_left_out(family, tiny_models):
    teacher = load_model(str(tiny_models[family]), kind="bi").model.eval()
    student = copy.deepcopy(teacher)
    batch = _batch(load_model(str(tiny_models[family]), kind="bi"))
    assert batch["attention_mask"].min() == 0  # the short text is padded
    with torch.no_grad(), LayerOutputs(student) as s, LayerOutputs(teacher) as t:
        student(**batch)
        teacher(**batch)
    assert len(s.states) == 3 and all(len(x) == 1 for x in s.states) and len(s.masks) == 1
    assert float(hidden_mse(s, t)) == 0.0
    with torch.no_grad():  # change the student's first layer: every later layer moves too
        next(p for n, p in student.named_parameters() if ".0." in n and p.ndim == 2).mul_(1.5)
        student(**batch)  # outside the block: nothing is recorded
    assert all(len(x) == 1 for x in s.states)
    with torch.no_grad(), LayerOutputs(student) as s, LayerOutputs(teacher) as t:
        student(**batch)
        teacher(**batch)
    got = float(hidden_mse(s, t))
    assert got > 0 and got == pytest.approx(_manual(student, teacher, batch), rel=1e-5)
    # padded positions do not count: garbage there leaves the measure unchanged
    s.states[2][0][0, batch["attention_mask"][0] == 0] += 100.0
    assert float(hidden_mse(s, t)) == pytest.approx(got, rel=1e-6)


@pytest.mark.parametrize("head", ["segment_cosine", "classifier"])
def test_cross_encoders_record_their_layers_too(head, tiny_models):
    """The cross kinds: the segment head calls its encoder with segment ids (padding -1), the
    monoBERT head with an attention mask; both give one record per layer and a zero error
    against themselves."""
    loaded = load_model(str(tiny_models["bert"]), head=head)
    model = loaded.model.eval()
    teacher = copy.deepcopy(model)
    batch = encode_pairs(loaded.tokenizer, ["what is a cat", "q"], ["a cat is an animal with fur", "p"], 32, model)
    with torch.no_grad(), LayerOutputs(model) as s, LayerOutputs(teacher) as t:
        model(**batch)
        teacher(**batch)
    assert [len(x) for x in s.states] == [1, 1, 1] and float(hidden_mse(s, t)) == 0.0
    assert int(s.masks[0].sum()) == int(batch["attention_mask"].sum())  # padding left out
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "layer.0." in n and p.ndim == 2).mul_(1.3)
    with torch.no_grad(), LayerOutputs(model) as s, LayerOutputs(teacher) as t:
        model(**batch)
        teacher(**batch)
    assert float(hidden_mse(s, t)) > 0


def test_distill_hidden_pulls_the_student_toward_its_teacher(tiny_models, toy_triples, tmp_path):
    """A student whose layers were disturbed, trained on the embedding distillation alone vs with
    --distill_hidden: the logged layer error falls, and ends lower than without it."""
    loaded = load_model(str(tiny_models["bert"]), kind="bi")
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "encoder.layer" in name and p.ndim == 2:
                p.add_(0.05 * torch.randn_like(p))
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "student")

    def train(weight: float, out: str) -> list[float]:
        args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(tmp_path / out),
                         num_training_samples=64, model_tag=str(tmp_path / "student"), batch_size=8,
                         max_length=32, learning_rate=2e-3, seed=3, distill_from=str(tiny_models["bert"]),
                         distill_target="embeddings", contrastive_weight=0.0, distill_hidden=weight)
        trainer = Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))
        final = trainer.train()
        student = load_model(str(final)).model.eval()
        teacher = load_model(str(tiny_models["bert"]), kind="bi").model.eval()
        batch = _batch(loaded)
        logged = [json.loads(x).get("hidden") for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return [x for x in logged if x is not None], _manual(student, teacher, batch)

    logged, with_hidden = train(10.0, "hidden")
    assert len(logged) == 8 and logged[-1] < 0.8 * logged[0], logged
    none_logged, without = train(0.0, "plain")
    assert none_logged == [] and with_hidden < 0.8 * without, (with_hidden, without)


def test_distill_hidden_needs_a_teacher(tiny_models, toy_triples, tmp_path):
    args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(tmp_path / "o"),
                     num_training_samples=16, model_tag=str(tiny_models["bert"]), batch_size=8,
                     distill_hidden=1.0)
    with pytest.raises(ValueError, match="--distill_hidden distils the hidden states of --distill_from"):
        args.validate()
