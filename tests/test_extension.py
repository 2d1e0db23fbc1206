"""A new loss, a new pruning criterion and a new model kind are one class each, registered here and nowhere else,
and the real trainer / pruning callback use them by name."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from common.kinds import KINDS, BiKind, register_kind
from common.kinds.loading import load_model, save_model
from common.pruning.importance import Importance, register_importance
from common.serving.rank import Ranker
from common.training.losses import Loss, get_loss, register_loss
from common.pruning.cycles import PruneArgs, PruneCallback
from common.training.schedules import WarmupLinear
from common.training.loop import TrainArgs, Trainer


# -- the toy loss: L1 between score margins (what --distill_loss offers is what takes these inputs)
@register_loss("toy_margin_l1")
class ToyMarginL1(Loss):
    inputs = ("scores", "teacher_scores")
    values: list[float] = []  # every value it returned, in order

    def check(self, scores, teacher):
        self._rows("scores", scores, 2)
        self._same("teacher_scores", scores, teacher)

    def compute(self, scores, teacher):
        loss = ((scores[:, 0] - scores[:, 1]) - (teacher[:, 0] - teacher[:, 1])).abs().mean()
        ToyMarginL1.values.append(loss.item())
        return loss


# -- the toy scorer: sees the scoring window's batches; ranks the last heads / neurons lowest
@register_importance("toy_last_first")
class ToyLastFirst(Importance):
    head_data = True
    head_key, ffn_key, count_key = "toy", "toy", "toy_batches"

    def __init__(self, state):
        super().__init__(state)
        self.batches = 0

    def observe(self, model, batch):
        self.batches += 1

    def observed(self):
        return self.batches

    def reset(self):
        self.batches = 0

    def head_scores(self, model=None):
        return [[-float(10 * layer + head) for head in range(self.state.num_heads)]
                for layer in range(self.state.num_layers)]

    def ffn_scores(self, model=None):
        return [[-float(n) for n in range(self.state.ffn_size)] for _ in range(self.state.num_layers)]

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, data):
        self.batches = data["batches"]


def _args(tiny_models, triples, out, **kw):
    base = dict(train_triples_file=str(triples), output_dir=str(out), num_training_samples=48,
                model_tag=str(tiny_models["bert"]), batch_size=8, max_length=32,
                learning_rate=5e-4, seed=3)
    base.update(kw)
    return TrainArgs(**base)


def _train_losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["event"] == "train"]


def test_a_registered_loss_is_what_the_trainer_optimises(tiny_models, toy_triples, tmp_path):
    scores = tmp_path / "scores.parquet"
    pd.DataFrame({"teacher_pos": [float(i % 5) for i in range(64)],
                  "teacher_neg": [float(i % 3) for i in range(64)]}).to_parquet(scores)
    ToyMarginL1.values.clear()
    schedule = lambda t: WarmupLinear(t.total_steps, 1)  # noqa: E731
    trainer = Trainer(_args(tiny_models, toy_triples, tmp_path / "toy", distill_scores=str(scores),
                            distill_loss="toy_margin_l1"), "initial", schedule)
    assert isinstance(trainer.loss, ToyMarginL1)
    trainer.train()
    assert _train_losses(tmp_path / "toy") == ToyMarginL1.values and len(ToyMarginL1.values) == 6
    Trainer(_args(tiny_models, toy_triples, tmp_path / "mse", distill_scores=str(scores)), "initial",
            schedule).train()
    assert _train_losses(tmp_path / "mse") != ToyMarginL1.values  # margin-MSE is another loss
    with pytest.raises(ValueError, match="--distill_loss must be one of .*toy_margin_l1"):
        _args(tiny_models, toy_triples, tmp_path / "x", distill_loss="nope").validate()


def test_a_registered_scorer_chooses_what_is_pruned(tiny_models, toy_triples, tmp_path):
    prune = PruneArgs(target_heads=9, target_ffn=30, num_prune_cycles=2, score_fraction=0.5,
                      importance="toy_last_first")
    callback = PruneCallback("mixed", prune)
    trainer = Trainer(_args(tiny_models, toy_triples, tmp_path / "p"), "mixed", callback.schedule,
                      callback)
    assert isinstance(callback.scorer, ToyLastFirst)
    last = trainer.train()
    history = json.loads((last / "pruning.json").read_text())["history"]
    # 3 layers x 4 heads, layer 0 held out: the highest (layer, head) go first, 2 then 1
    assert [[(h["layer"], h["head"]) for h in e["heads"]] for e in history] == [[(2, 3), (2, 2)], [(2, 1)]]
    assert all(h["toy"] == -(10 * h["layer"] + h["head"]) for e in history for h in e["heads"])
    # each cycle has 2 steps; the scoring window is its last one
    assert [e["toy_batches"] for e in history] == [1, 1]
    assert trainer.state.kept_heads == [[0, 1, 2, 3], [0, 1, 2, 3], [0]]
    # FFN: the highest neuron indices go first, in every prunable layer (37 -> 30)
    assert [e["ffn"]["1"]["neurons"] for e in history] == [[33, 34, 35, 36], [30, 31, 32]]
    assert trainer.state.kept_ffn[2] == list(range(30))
    layers = trainer.model.bert.encoder.layer
    d = trainer.state.head_size
    assert torch.all(layers[2].attention.self.query.weight[d:] == 0)  # the masked heads
    assert torch.all(layers[2].attention.self.query.weight[:d].abs().sum(dim=1) > 0)
    assert torch.all(layers[1].attention.self.query.weight.abs().sum(dim=1) > 0)


def test_losses_check_their_input_shapes():
    with pytest.raises(ValueError, match=r"margin_mse: scores must have shape \(rows, 2\), got \(4, 3\)"):
        get_loss("margin_mse")(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"kl: teacher_scores must have shape \(4, 3\), got \(4, 2\)"):
        get_loss("kl")(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"cross_entropy: logits must have shape \(2 \* rows, 2\)"):
        get_loss("cross_entropy")(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"in_batch_contrastive: passage_embeddings .*\(k \* 2, 8\), got \(3, 8\)"):
        get_loss("in_batch_contrastive")(torch.zeros(2, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match="embedding_mse: teacher_embeddings"):
        get_loss("embedding_mse")([torch.zeros(2, 8)], [torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        get_loss("nope")


# -- the toy model kind: a bi-encoder that ranks by the opposite of its cosine, and says its
# queries cost two sequences each (what a kind is: one class, registered by name)
class ToyReversedBi(BiKind):
    @classmethod
    def score(cls, ranker, queries, passages, progress=False):
        return -BiKind.score(ranker, queries, passages, progress)

    @staticmethod
    def sequences_per_query(n_pairs):
        return n_pairs + 2


def test_a_registered_kind_is_what_loading_scoring_and_training_use(tiny_models, toy_triples, tmp_path):
    register_kind("toy_reversed_bi")(ToyReversedBi)
    try:
        queries, passages = ["what is a cat", "what is a cat"], ["a cat is an animal", "stocks fell"]
        loaded = load_model(str(tiny_models["bert"]), kind="toy_reversed_bi")
        assert loaded.kind == "toy_reversed_bi"
        save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "toy")
        again = load_model(str(tmp_path / "toy"))  # config.json keeps the kind's name
        assert again.kind == "toy_reversed_bi"
        ranker = Ranker.from_loaded(again)
        assert ranker.kind is ToyReversedBi and ranker.sequences_per_query(100) == 102
        bi = Ranker.from_loaded(load_model(str(tiny_models["bert"]), kind="bi"))
        np.testing.assert_allclose(ranker.score(queries, passages), -bi.score(queries, passages), atol=1e-6)
        trainer = Trainer(_args(tiny_models, toy_triples, tmp_path / "t", model_kind="toy_reversed_bi",
                                num_training_samples=8), "initial", lambda t: WarmupLinear(t.total_steps, 1))
        assert isinstance(trainer.training_kind, ToyReversedBi)
        assert trainer.train().is_dir()
        with pytest.raises(ValueError, match=r"model kind must be one of \('cross', 'bi', 'toy_reversed_bi'\)"):
            load_model(str(tiny_models["bert"]), kind="nope")
        with pytest.raises(ValueError, match="--model_kind must be one of cross, bi, toy_reversed_bi, got 'nope'"):
            _args(tiny_models, toy_triples, tmp_path / "x", model_kind="nope").validate()
    finally:
        KINDS.pop("toy_reversed_bi")
