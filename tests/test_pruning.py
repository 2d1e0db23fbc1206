"""Masks, importance, selection, prune events in the loop, reshape and the pruned-model loader."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from common.pruning.importance import HeadConfidence, select_ffn, select_heads
from common.models.loading import encode_pairs
from common.kinds.loading import load_model, reshape_checkpoint, save_model, score_pairs
from common.pruning.cycles import PruneArgs, PruneCallback, make_plan
from common.models.structure import PruningState, analytic_param_count, zero_dead_weights
from common.training.loop import TrainArgs, Trainer
from conftest import straight_and_resumed

QUERIES = ["what is a cat", "how tall is mount everest", "define entropy"] * 2
PASSAGES = ["a cat is a small domesticated carnivorous mammal",
            "mount everest is 8849 metres tall, the highest mountain above sea level",
            "entropy is a measure of disorder in a system and of uncertainty",
            "the stock market fell today", "bananas are yellow", "python is a language"]


def prune_some(state: PruningState) -> None:
    """A structure with an empty attention block, an empty FFN, and partial layers."""
    state.kept_heads[1] = []
    state.kept_heads[2] = [0, 3]
    state.kept_ffn[0] = []
    state.kept_ffn[2] = list(range(0, state.ffn_size, 3))


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "electra"])
def test_reshaped_equals_masked_and_round_trips(family, tiny_models, tmp_path):
    loaded = load_model(str(tiny_models[family]))
    model, state = loaded.model.eval(), loaded.state
    unpruned = sum(p.numel() for p in model.parameters())
    prune_some(state)
    loaded.masks.refresh()
    zero_dead_weights(model, state)
    masked = score_pairs(model, loaded.tokenizer, QUERIES, PASSAGES, batch_size=4)
    save_model(model, loaded.tokenizer, state, tmp_path / "masked")
    out, before, after = reshape_checkpoint(str(tmp_path / "masked"), str(tmp_path / "reshaped"))
    assert before == unpruned and after < before
    again = load_model(str(out))
    assert again.state.is_reshaped and again.state.heads_per_layer == [4, 0, 2]
    reshaped = score_pairs(again.model, again.tokenizer, QUERIES, PASSAGES, batch_size=4)
    torch.testing.assert_close(torch.tensor(reshaped), torch.tensor(masked), atol=1e-5, rtol=0)
    hidden = model.config.hidden_size if family != "distilbert" else model.config.dim
    assert after == analytic_param_count(again.state, hidden, unpruned)
    # save -> load round trip is exact
    save_model(again.model, again.tokenizer, again.state, tmp_path / "copy")
    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(tmp_path / "copy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((out / "pruning.json").read_text())
    assert info["reshaped"] and info["ffn_per_layer"][0] == 0


def test_selection_never_stalls_on_dead_heads_or_ties():
    state = PruningState("bert", 4, 8, 10, [list(range(4))] * 3, [list(range(10))] * 3,
                         [[0, 1, 2, 3], [1, 2, 3], [0, 1, 2, 3]], [list(range(10))] * 3)
    scores = [[0.0] * 4, [0.0, 0.1, 0.1, 0.1], [0.1] * 4]  # head (1, 0) is dead and scores lowest
    chosen = select_heads(scores, state, 3)
    assert (1, 0) not in chosen and all(layer != 0 for layer, _ in chosen)
    assert chosen == [(1, 1), (1, 2), (2, 0)]  # ties by (layer, head); layer 1 keeps its last head
    assert select_heads(scores, state, 2, exclude_layers=set(), allow_empty_layers=True) == [(0, 0), (0, 1)]
    nan = [[math.nan] * 4] * 3
    assert len(select_heads(nan, state, 1)) == 1
    ffn_scores = [[float(i) for i in range(10)]] * 3
    assert select_ffn(ffn_scores, state, 3) == {1: [0, 1, 2], 2: [0, 1, 2]}
    assert sum(map(len, select_ffn(ffn_scores, state, 3, scope="global").values())) == 6
    assert select_ffn(ffn_scores, state, 20) == {1: list(range(9)), 2: list(range(9))}


def test_head_confidence_is_a_probability(tiny_models):
    loaded = load_model(str(tiny_models["bert"]))
    batch = encode_pairs(loaded.tokenizer, QUERIES, PASSAGES, 32)
    conf = HeadConfidence(loaded.state)
    conf.observe(loaded.model, batch)
    scores = conf.scores()
    assert conf.pairs == len(QUERIES)
    assert all(0 < s <= 1 for layer in scores for s in layer)
    assert loaded.model.config._attn_implementation == "sdpa"  # switched back after scoring


def test_prune_step_updates_every_live_weight_and_no_dead_one(tiny_models, toy_triples, tmp_path):
    args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(tmp_path / "o"),
                     num_training_samples=64, model_tag=str(tiny_models["bert"]), batch_size=8,
                     max_length=32, learning_rate=1e-3)
    trainer = Trainer(args, "initial", lambda t: (lambda step: 1.0))
    trainer._train_step([("q one", "p one", "n one")] * 4)  # optimizer state exists
    prune_some(trainer.state)
    trainer.masks.refresh()
    zero_dead_weights(trainer.model, trainer.state, trainer.optimizer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer._train_step([("what is topic", "topic passage", "unrelated words")] * 4)
    layers = trainer.model.bert.encoder.layer
    q = layers[2].attention.self.query.weight
    o = layers[2].attention.output.dense.weight
    dead_rows = torch.cat([torch.arange(8, 16), torch.arange(16, 24)])  # heads 1 and 2 of 4 x 8
    name = "bert.encoder.layer.2.attention.self.query.weight"
    assert torch.all(q[dead_rows] == 0) and torch.all(before[name][dead_rows] == 0)
    assert torch.all(o[:, dead_rows] == 0)
    live = torch.tensor([r for r in range(32) if r not in set(dead_rows.tolist())])
    assert torch.all(q[live] != before[name][live])
    assert torch.all(layers[0].intermediate.dense.weight == 0)
    assert torch.all(layers[1].attention.self.value.weight == 0)
    for n, p in trainer.model.named_parameters():
        if "layer.0.intermediate" in n or "layer.0.output.dense.weight" in n or "layer.1.attention.self" in n:
            continue
        if n.endswith(("query.weight", "key.weight", "value.weight")) and ".layer.2." in n:
            continue
        if n in ("bert.encoder.layer.2.attention.output.dense.weight",
                 "bert.encoder.layer.2.intermediate.dense.weight",
                 "bert.encoder.layer.2.intermediate.dense.bias",
                 "bert.encoder.layer.2.output.dense.weight",
                 "bert.encoder.layer.1.attention.output.dense.weight") or n.endswith(
                ("layer.2.attention.self.query.bias", "layer.2.attention.self.key.bias",
                 "layer.2.attention.self.value.bias")):
            continue
        assert not torch.equal(p, before[n]), f"{n} did not change"


def prune_args(tiny_models, triples, out, **kw):
    base = dict(train_triples_file=str(triples), output_dir=str(out), num_training_samples=48,
                model_tag=str(tiny_models["bert"]), batch_size=8, max_length=32,
                learning_rate=5e-4, seed=5)
    base.update(kw)
    return TrainArgs(**base)


def test_plans():
    state = PruningState.full(type("C", (), dict(model_type="bert", num_hidden_layers=3,
                                                 num_attention_heads=4, hidden_size=32,
                                                 intermediate_size=40))())
    plan = make_plan("heads", PruneArgs(target_sparsity=0.5), state, total_steps=50, batch_size=8)
    assert plan.head_events == [1, 1, 1, 1] and plan.cycle_steps == 10 and not plan.ffn_events
    plan = make_plan("mixed", PruneArgs(target_heads=8, target_ffn=20, num_prune_cycles=3,
                                        num_warmup_samples=16), state, 20, 8)
    assert sum(plan.head_events) == 4 and sum(plan.ffn_events) == 20 and plan.warmup_steps == 2
    with pytest.raises(ValueError, match="cannot hold"):
        make_plan("heads", PruneArgs(target_sparsity=0.5), state, total_steps=3, batch_size=8)


def test_last_cycle_takes_the_leftover_steps():
    """23 steps, 1 warmup step, 3 cycles of 7: the LR restarts at steps 1, 8 and 15 only; the
    last cycle stretches over the 8 steps left and decays to its floor at the very end."""
    from common.training.schedules import CosineRestarts

    lr = CosineRestarts(7, warmup_steps=1, min_ratio=0.1, cycles=3, total_steps=23)
    values = [lr(s) for s in range(23)]
    restarts = [s for s in range(1, 23) if values[s] > values[s - 1]]
    assert restarts == [8, 15] and values[1] == values[8] == values[15] == 1.0
    assert all(values[s] > values[s + 1] for s in range(15, 22))
    assert lr(23) == pytest.approx(0.1) and values[22] > 0.1
    plain = CosineRestarts(7, warmup_steps=1, min_ratio=0.1)  # without them: a 4th restart
    assert plain(22) == 1.0
    with pytest.raises(ValueError, match="go together"):
        CosineRestarts(7, cycles=3)


@pytest.mark.parametrize("kind", ["heads", "mixed", "mixed_activation"])
def test_prune_and_resume_equals_straight_run(kind, tiny_models, toy_triples, tmp_path):
    """Pruning in the loop: events happen, and prune + resume equals the straight run (also
    with activation importance, whose FFN scores come from the interrupted window)."""
    prune = dict(heads=PruneArgs(target_sparsity=0.25, score_fraction=0.5),
                 mixed=PruneArgs(target_heads=9, target_ffn=25, num_prune_cycles=2),
                 mixed_activation=PruneArgs(target_heads=9, target_ffn=25, num_prune_cycles=2,
                                            score_fraction=0.5, importance="activation"))[kind]
    kind = kind.split("_")[0]

    def run(out, every=0, checkpoint_dir=None, stop=None):
        callback = PruneCallback(kind, prune)
        kw = dict(num_checkpoint_samples=every)
        if checkpoint_dir:
            kw["checkpoint_dir"] = checkpoint_dir
        trainer = Trainer(prune_args(tiny_models, toy_triples, out, **kw), kind, callback.schedule,
                          callback)
        if stop:
            trainer.total_steps = stop
        return trainer, trainer.train()

    trainer, straight = run(tmp_path / "a")
    history = trainer.state.history
    assert len(history) == 2  # two prune events, then the recovery cycle
    assert trainer.state.total_heads == (10 if kind == "heads" else 9)
    assert trainer.state.heads_per_layer[0] == 4  # layer 0 is held out
    if kind == "mixed":
        assert trainer.state.ffn_per_layer == [37, 25, 25]
    _, half = run(tmp_path / "b", every=16, stop=2)  # stops inside the first scoring window
    _, end = run(tmp_path / "b", every=16, checkpoint_dir=str(half))
    assert end.name == straight.name
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(end / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    ha = json.loads((straight / "pruning.json").read_text())["history"]
    hb = json.loads((end / "pruning.json").read_text())["history"]
    assert [e.get("heads") for e in ha] == [e.get("heads") for e in hb]
    assert [e.get("ffn") for e in ha] == [e.get("ffn") for e in hb]
    if prune.importance == "activation":
        assert all("activation" in v for e in ha for v in e["ffn"].values())
        assert all(e["scored_tokens"] > 0 and "output_norm" in e["heads"][0] for e in ha)
    lrs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    prune_steps = [x["stage_pairs"] for x in lrs if x["event"] == "prune"]
    train = {x["stage_pairs"]: x["lr"] for x in lrs if x["event"] == "train"}
    # the LR restarts at its peak right after every prune event
    for pairs in prune_steps:
        assert train[pairs + 8] > train[pairs]


@pytest.mark.parametrize("family,model_kind,stage", [("xlm-roberta", "cross1", "mixed"), ("xlm-roberta", "bi", "l0"),
                                                     ("modernbert", "cross1", "l0"), ("modernbert", "bi", "mixed")])
def test_prune_and_resume_equals_straight_run_on_byo_families(family, model_kind, stage, toy_triples, tmp_path):
    """XLM-RoBERTa and ModernBERT as their owners save them (tests/test_byo.py: a trained 1-label
    CrossEncoder dir, a SentenceTransformer dir with pooling, Dense and prompts), dropout 0.1:
    a prune stage stopped at its first checkpoint and resumed equals the straight run."""
    from common.pruning.l0 import L0Args, L0Callback
    from test_byo import build

    model = str(build(family, model_kind, tmp_path / "m", dropout=0.1))
    bi = dict(model_kind="bi", distill_from=model, distill_target="embeddings", contrastive_weight=0.0) \
        if model_kind == "bi" else {}

    def run(out, every=0, checkpoint_dir=None, stop=None):
        callback = (L0Callback(L0Args(target_macs_ratio=0.5, l0_learning_rate=0.2)) if stage == "l0" else
                    PruneCallback("mixed", PruneArgs(target_heads=9, target_ffn=25, num_prune_cycles=2)))
        args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(out), num_training_samples=48,
                         num_checkpoint_samples=every, model_tag=model, checkpoint_dir=checkpoint_dir,
                         batch_size=8, max_length=32, learning_rate=5e-4, seed=5, threads=1, **bi)
        trainer = Trainer(args, stage, callback.schedule, callback)
        if stop:
            trainer.total_steps = stop
        return trainer.train()

    straight, end, a, b = straight_and_resumed(run, tmp_path)
    assert end.name == straight.name
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    pa = json.loads((straight / "pruning.json").read_text())
    pb = json.loads((end / "pruning.json").read_text())
    assert pa["kept_heads"] == pb["kept_heads"] and pa["kept_ffn"] == pb["kept_ffn"]
    assert sum(map(len, pa["kept_heads"])) < 12  # the stage pruned


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_fvcore_counts_the_reshaped_model_analytically(family, tiny_models, tmp_path):
    """fvcore (with the SDPA handler) on a model reshaped by our surgery == the analytic count
    from pruning.json's per-layer heads and FFN widths."""
    from common.evaluation import cost

    loaded = load_model(str(tiny_models[family]))
    prune_some(loaded.state)
    zero_dead_weights(loaded.model, loaded.state)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "m")
    out, _, _ = reshape_checkpoint(str(tmp_path / "m"))
    again = load_model(str(out))
    inputs = cost.worst_case_inputs(again.tokenizer, n_pairs=3, max_length=24)
    measured = cost.fvcore_macs(again.model, **inputs)
    state = again.state
    expected = cost.analytic_macs(hidden=state.head_size * state.num_heads, head_size=state.head_size,
                                  heads_per_layer=state.heads_per_layer,
                                  ffn_per_layer=state.ffn_per_layer, seq_len=24, batch=3,
                                  head=family)
    assert measured == expected
    unpruned = cost.fvcore_macs(load_model(str(tiny_models[family])).model, **inputs)
    assert measured < unpruned


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_bi_encoder_prunes_reshapes_and_drops_layers(family, tiny_models, tmp_path):
    """The bi-encoder kind goes through the same adapter: masked == reshaped; layer dropping."""
    from common.evaluation import cost
    from common.models.encoders import encode

    loaded = load_model(str(tiny_models[family]), kind="bi", pooling="mean")
    assert loaded.kind == "bi" and loaded.model is loaded.model.base_model
    prune_some(loaded.state)
    loaded.masks.refresh()
    zero_dead_weights(loaded.model, loaded.state)
    masked = score_pairs(loaded.model, loaded.tokenizer, QUERIES, PASSAGES)
    q = encode(loaded.model, loaded.tokenizer, QUERIES[:1])
    p = encode(loaded.model, loaded.tokenizer, PASSAGES[:1])
    assert abs(float((q * p).sum()) - masked[0]) < 1e-5  # cosine of mean-pooled embeddings
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "m")
    out, before, after = reshape_checkpoint(str(tmp_path / "m"))
    again = load_model(str(out))
    assert again.kind == "bi"
    reshaped = score_pairs(again.model, again.tokenizer, QUERIES, PASSAGES)
    torch.testing.assert_close(torch.tensor(reshaped), torch.tensor(masked), atol=1e-5, rtol=0)
    # layer dropping keeps the first n layers and nothing else
    out2, _, after2 = reshape_checkpoint(str(tiny_models[family]), str(tmp_path / "two"),
                                         keep_layers=2, kind="bi")
    two = load_model(str(out2))
    assert len(two.state.kept_heads) == 2 and two.state.history == [{"keep_layers": 2}]
    inputs = cost.worst_case_inputs(two.tokenizer, n_pairs=1, max_length=16)
    arch = cost.architecture(two.model)
    assert arch["head"] == "none" and len(arch["heads_per_layer"]) == 2
    assert cost.fvcore_macs(two.model, **inputs) == cost.analytic_macs(seq_len=16, **arch)


def test_bi_encoder_training_resumes_exactly(tiny_models, toy_triples, tmp_path):
    from common.training.schedules import WarmupLinear

    def run(out, every=0, checkpoint_dir=None, stop=None):
        args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(out), num_training_samples=32,
                         num_checkpoint_samples=every, model_tag=str(tiny_models["bert"]),
                         checkpoint_dir=checkpoint_dir, model_kind="bi", batch_size=8, max_length=32,
                         learning_rate=1e-3, seed=2)
        trainer = Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))
        if stop:
            trainer.total_steps = stop
        return trainer.train()

    straight, end, a, b = straight_and_resumed(run, tmp_path)
    assert not any(k.startswith("classifier") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    losses = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
              if '"train"' in x]
    assert all(math.isfinite(x["loss"]) for x in losses)


def test_activation_importance_finds_silent_units(tiny_models):
    """A head whose output-projection columns are zero and a neuron whose output column is zero
    write nothing into the residual stream: they score 0 and are the first selected; scores
    are keyed by original index, also after units were masked; counts survive flat()/load."""
    from common.pruning.importance import ActivationImportance
    from common.kinds.loading import load_model

    loaded = load_model(str(tiny_models["bert"]))
    model, state = loaded.model, loaded.state
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():
        layer.attention.output.dense.weight[:, 2 * state.head_size:3 * state.head_size] = 0
        layer.output.dense.weight[:, 7] = 0
    state.kept_heads[2].remove(0)  # a masked head elsewhere: not a candidate any more
    loaded.masks.refresh()
    tok = loaded.tokenizer
    batch = dict(tok(["a query", "another longer query text"], ["passage one", "passage two is here"],
                     padding=True, return_tensors="pt"))
    scorer = ActivationImportance(state)
    scorer.observe(model, batch)
    assert scorer.tokens == int(batch["attention_mask"].sum())
    heads, ffn = scorer.head_scores(), scorer.ffn_scores()
    assert heads[1][2] == 0 and min(h for row in heads for h in row) == 0
    assert ffn[1][7] == 0 and all(x > 0 for x in ffn[1][:7] + ffn[1][8:])
    assert select_heads(heads, state, 1, exclude_layers=set()) == [(1, 2)]
    assert select_ffn(ffn, state, 1, exclude_layers={0, 2})[1] == [7]
    again = ActivationImportance(state)
    again.load_flat(scorer.flat())
    assert again.head_scores() == heads and again.ffn_scores() == ffn
    with pytest.raises(ValueError, match="importance"):
        PruneArgs(importance="magnitude")


@pytest.mark.parametrize("importance", ["activation", "confidence"])
def test_scores_over_length_chunks_equal_the_whole_batch(importance, tiny_models):
    """The importance scores are sums over sequences: observed over the batch's length-sorted
    chunks (each padded only to its own longest, as --group_by_length's scoring pass runs) they
    equal those of the whole padded batch, tokens / pairs counted alike."""
    from common.kinds.base import length_chunks
    from common.pruning.importance import get_importance

    loaded = load_model(str(tiny_models["bert"]))
    model, state = loaded.model, loaded.state
    queries = [f"query {i}" for i in range(12)]
    passages = [" ".join(["word"] * (2 + (i * 11) % 30)) for i in range(12)]
    batch = encode_pairs(loaded.tokenizer, queries, passages, 64, model)
    whole, chunked = get_importance(importance, state), get_importance(importance, state)
    whole.observe(model, batch)
    parts = list(length_chunks(batch, 5))
    assert [len(index) for index, _ in parts] == [5, 5, 2]
    assert sum(p["input_ids"].numel() for _, p in parts) < batch["input_ids"].numel()
    for _index, part in parts:
        chunked.observe(model, part)
    assert chunked.observed() == whole.observed() > 0
    for a, b in ((whole.head_scores(model), chunked.head_scores(model)),
                 (whole.ffn_scores(model), chunked.ffn_scores(model))):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=1e-4)
    assert [(i, p) for i, p in length_chunks(batch, 0)] == [(None, batch)]  # 0: the batch at once


def test_group_by_length_scores_in_chunks_during_pruning(tiny_models, tmp_path, monkeypatch):
    """03c with --group_by_length: the scoring pass sees the training forward's chunks
    (LENGTH_CHUNK sequences at most), never the whole padded batch."""
    from common.pruning.importance import ActivationImportance
    from common.training.loop import LENGTH_CHUNK
    from test_train import write_varied_triples

    seen = []
    original = ActivationImportance.observe

    def spy(self, model, batch):
        seen.append(tuple(batch["input_ids"].shape))
        return original(self, model, batch)
    monkeypatch.setattr(ActivationImportance, "observe", spy)
    triples = write_varied_triples(tmp_path / "v.tsv")
    callback = PruneCallback("mixed", PruneArgs(target_heads=9, target_ffn=25, num_prune_cycles=2,
                                                score_fraction=0.5, importance="activation"))
    trainer = Trainer(prune_args(tiny_models, triples, tmp_path / "o", batch_size=32, num_training_samples=192,
                                 group_by_length=True, max_length=64), "mixed", callback.schedule, callback)
    trainer.train()
    assert seen and all(n <= LENGTH_CHUNK for n, _ in seen) and len({t for _, t in seen}) > 1
    assert trainer.state.total_heads == 9


def test_reshaped_bi_encoder_recovers_by_embedding_distillation(tiny_models, toy_triples, tmp_path):
    """A recovery stage on a reshaped bi-encoder: 02's loop trains the small model itself
    (its shapes stay), distilling the unpruned parent's embeddings, and moves closer to it."""
    from common.models.encoders import encode
    from common.training.schedules import WarmupLinear

    loaded = load_model(str(tiny_models["bert"]), kind="bi", pooling="mean")
    prune_some(loaded.state)
    loaded.masks.refresh()
    zero_dead_weights(loaded.model, loaded.state)
    save_model(loaded.model, loaded.tokenizer, loaded.state, tmp_path / "m")
    small, _, _ = reshape_checkpoint(str(tmp_path / "m"))
    shrunk = load_model(str(small))
    torch.manual_seed(0)
    with torch.no_grad():  # start far from the parent (random tiny models barely feel pruning)
        for weight in shrunk.model.parameters():
            weight.add_(0.3 * torch.randn_like(weight))
    save_model(shrunk.model, shrunk.tokenizer, shrunk.state, tmp_path / "far")
    small = tmp_path / "far"
    parent = load_model(str(tiny_models["bert"]), kind="bi", pooling="mean")
    texts = QUERIES + PASSAGES

    def distance(path) -> float:
        student = load_model(str(path))
        a = encode(student.model, student.tokenizer, texts)
        b = encode(parent.model, parent.tokenizer, texts)
        return float(((a - b) ** 2).sum(-1).mean())

    args = TrainArgs(train_triples_file=str(toy_triples), output_dir=str(tmp_path / "rec"),
                     num_training_samples=128, num_checkpoint_samples=0, model_tag=str(small),
                     distill_from=str(tiny_models["bert"]), distill_target="embeddings",
                     contrastive_weight=0.0, batch_size=8, max_length=32, learning_rate=2e-3, seed=5)
    trainer = Trainer(args, "initial", lambda t: WarmupLinear(t.total_steps, 1))
    assert trainer.kind == "bi" and trainer.state.is_reshaped
    end = trainer.train()
    after = load_model(str(end))
    assert after.state.heads_per_layer == trainer.state.heads_per_layer
    assert after.state.is_reshaped and after.state.total_heads < 4 * after.state.num_layers
    assert distance(end) < distance(small)
