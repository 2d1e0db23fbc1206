"""L0 gates (03d): expected cost, exact final masks, the Lagrangian, masked == reshaped, resume."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.evaluation.cost import analytic_macs
from common.pruning.l0 import Gates, L0Args, L0Callback, deterministic, prob_nonzero, sample
from common.kinds.loading import load_model, reshape_checkpoint, score_pairs
from common.models.structure import PruningState
from common.training.loop import TrainArgs, Trainer

QUERIES = ["what is a cat", "how tall is mount everest", "define entropy"] * 2
PASSAGES = ["a cat is a small domesticated carnivorous mammal",
            "mount everest is 8849 metres tall, the highest mountain above sea level",
            "entropy is a measure of disorder in a system and of uncertainty",
            "the stock market fell today", "bananas are yellow", "python is a language"]


def toy_state(layers=3, heads=4, head_size=8, ffn=37) -> PruningState:
    h = [list(range(heads)) for _ in range(layers)]
    f = [list(range(ffn)) for _ in range(layers)]
    return PruningState("bert", heads, head_size, ffn, h, f, [list(x) for x in h], [list(x) for x in f])


def random_gates(seed=0, **kw) -> Gates:
    state = toy_state()
    state.kept_heads[2] = [0, 1]  # some units already dead: held shut
    arch = dict(hidden=32, head_size=8, heads_per_layer=[4] * 3, ffn_per_layer=[37] * 3, num_labels=2,
                head="bert", embedding_size=None)
    gates = Gates(state, 0.0, arch, seq_len=16, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    return gates


def test_hard_concrete_distribution():
    log_alpha = torch.tensor([-3.0, 0.0, 1.0, 4.0])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(log_alpha, g) for _ in range(20000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert ((draws == 0).any(0) & (draws == 1).any(0)).all()  # exact zeros and ones occur
    torch.testing.assert_close((draws > 0).float().mean(0), prob_nonzero(log_alpha), atol=0.01, rtol=0)
    assert deterministic(torch.tensor([5.0]))[0] == 1 and deterministic(torch.tensor([-5.0]))[0] == 0


def test_expected_cost_is_the_mean_cost_of_sampled_masks():
    gates = random_gates()
    g = torch.Generator().manual_seed(1)
    costs = []
    for _ in range(4000):
        heads, ffn = gates.sampled_counts(g)
        costs.append(analytic_macs(32, 8, heads.int().tolist(), ffn.int().tolist(), seq_len=16))
    mc = torch.tensor(costs, dtype=torch.float64)
    expected = float(gates.expected_macs().detach())
    assert abs(mc.mean().item() - expected) < 3 * mc.std().item() / len(costs) ** 0.5 + 1e-6 * expected
    # the formula is common.evaluation.cost's: all gates open is the unpruned model's cost
    with torch.no_grad():
        for p in gates.parameters():
            p.fill_(40.0)
    assert float(gates.expected_macs().detach()) == pytest.approx(
        analytic_macs(32, 8, [4, 4, 2], [37, 37, 37], seq_len=16), rel=1e-6)


@pytest.mark.parametrize("ratio", [0.2, 0.45, 0.7])
def test_final_masks_meet_a_cost_target_exactly(ratio):
    gates = random_gates()
    heads, ffn = gates.final_masks(L0Args(target_macs_ratio=ratio))
    cost = analytic_macs(32, 8, [len(h) for h in heads], [len(f) for f in ffn], seq_len=16)
    target = ratio * gates.full_macs
    all_neurons = sum(map(len, ffn)) == int(gates.ffn_alive.sum())
    # within one neuron of the budget (one head, when every neuron is already kept)
    assert cost <= target < cost + (gates.per_head if all_neurons else gates.per_neuron)
    assert set(heads[2]) <= {0, 1}  # a dead unit never comes back


def test_final_masks_meet_a_shape_target_exactly():
    gates = random_gates()
    heads, ffn = gates.final_masks(L0Args(target_heads=5, target_ffn=10, target_layers=2))
    assert sum(map(len, heads)) == 5 and sum(map(len, ffn)) == 20
    assert sum(1 for h, f in zip(heads, ffn) if h or f) <= 2
    score = (deterministic(gates.head) * deterministic(gates.attn_block)[:, None]).detach()
    kept = [float(score[i, h]) for i, hs in enumerate(heads) for h in hs]
    with pytest.raises(ValueError, match="more than the model has"):
        gates.final_masks(L0Args(target_heads=100))
    assert kept  # the kept heads are the best-scoring of the kept layers
    with pytest.raises(ValueError, match="either"):
        L0Args(target_macs_ratio=0.5, target_heads=3)
    with pytest.raises(ValueError, match="give a target"):
        L0Args()


def test_final_masks_meet_a_per_layer_head_target_exactly():
    """--target_heads_per_layer H: the top H heads of each kept layer; the layers are chosen among
    those with H heads left (layer 2 has 2 here); a model without enough such layers is refused."""
    gates = random_gates()
    heads, ffn = gates.final_masks(L0Args(target_heads_per_layer=3, target_layers=2))
    assert [len(h) for h in heads] == [3, 3, 0] and [len(f) for f in ffn] == [37, 37, 0]
    score = deterministic(gates.head).detach()
    for layer in (0, 1):  # the best 3 of the layer, whatever the other layers' scores
        assert heads[layer] == sorted(torch.argsort(score[layer], descending=True, stable=True)[:3].tolist())
    heads, _ = gates.final_masks(L0Args(target_heads_per_layer=2, target_ffn=5))
    assert [len(h) for h in heads] == [2, 2, 2] and set(heads[2]) <= {0, 1}
    with pytest.raises(ValueError, match=r"--target_heads_per_layer 3: layer\(s\) \[2\] have fewer heads left \(\[2\]\)"):
        gates.final_masks(L0Args(target_heads_per_layer=3))
    with pytest.raises(ValueError, match="not both"):
        L0Args(target_heads=6, target_heads_per_layer=2)
    assert L0Args(target_heads_per_layer=2, target_layers=2).heads_in_total(3) == 4
    assert L0Args(target_heads_per_layer=2).heads_in_total(3) == 6


def l0_args(tiny_models, triples, out, kind="cross", **kw) -> TrainArgs:
    base = dict(train_triples_file=str(triples), output_dir=str(out), num_training_samples=64,
                model_tag=str(tiny_models["bert"]), batch_size=8, max_length=32, learning_rate=1e-3,
                seed=3, model_kind=kind)
    if kind == "bi":
        base.update(distill_from=str(tiny_models["bert"]), distill_target="embeddings",
                    contrastive_weight=0.0)
    base.update(kw)
    return TrainArgs(**base)


def run_l0(tiny_models, triples, out, l0: L0Args, kind="cross", stop=None, **kw):
    callback = L0Callback(l0)
    trainer = Trainer(l0_args(tiny_models, triples, out, kind, **kw), "l0", callback.schedule, callback)
    if stop:
        trainer.total_steps = stop
    return trainer, trainer.train()


def records(out, event):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if f'"{event}"' in x]


@pytest.mark.parametrize("kind,family", [("cross", "bert"), ("bi", "bert"), ("cross", "electra"),
                                         ("bi", "distilbert"), ("segment", "bert")])
def test_l0_stage_meets_the_target_and_masked_equals_reshaped(kind, family, tiny_models, toy_triples, tmp_path):
    from common.evaluation.cost import architecture, fvcore_macs, worst_case_inputs

    l0 = L0Args(target_macs_ratio=0.4, l0_learning_rate=0.2, l0_warmup_fraction=0.5)
    kw = dict(model_tag=str(tiny_models[family]))
    if kind == "bi":
        kw["distill_from"] = str(tiny_models[family])
    if kind == "segment":  # the main job's cross-encoder head (common.models.segment)
        kind, kw["head"] = "cross", "segment_cosine"
    trainer, last = run_l0(tiny_models, toy_triples, tmp_path / "a", l0, kind, **kw)
    info = json.loads((last / "pruning.json").read_text())
    event = info["history"][-1]["l0"]
    full = analytic_macs(seq_len=32, **architecture(
        load_model(str(tiny_models[family]), kind=kind, head=kw.get("head")).model))
    assert not (last / "l0_gates.pt").exists()  # the last checkpoint is an ordinary masked one
    masked = load_model(str(last))
    a = score_pairs(masked.model, masked.tokenizer, QUERIES, PASSAGES, max_length=32)
    out, _, _ = reshape_checkpoint(str(last))
    reshaped = load_model(str(out))
    assert reshaped.state.is_reshaped and reshaped.state.heads_per_layer == info["heads_per_layer"]
    b = score_pairs(reshaped.model, reshaped.tokenizer, QUERIES, PASSAGES, max_length=32)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), atol=1e-5, rtol=0)
    # the cost the gates were held to is the reshaped model's analytic cost, which is what fvcore
    # measures (the segment head's pair layout aside: its own check is in test_segment)
    macs = analytic_macs(seq_len=32, **architecture(reshaped.model))
    assert macs / full == pytest.approx(event["macs_ratio"], abs=1e-5) and macs <= 0.4 * full
    if "head" not in kw:
        assert fvcore_macs(reshaped.model, **worst_case_inputs(reshaped.tokenizer, n_pairs=1, max_length=32)) == macs
    train = records(tmp_path / "a", "train")
    assert all("lagrangian" in r and "expected_macs" in r for r in train)


def test_lagrangian_moves_the_expected_cost_to_the_target(tiny_models, tmp_path):
    from conftest import write_toy_triples

    toy_triples = write_toy_triples(tmp_path / "t.tsv", n=128)
    l0 = L0Args(target_macs_ratio=0.3, l0_learning_rate=0.3, l0_warmup_fraction=0.25)
    run_l0(tiny_models, toy_triples, tmp_path / "a", l0, num_training_samples=256)
    train = records(tmp_path / "a", "train")
    first, last = train[0]["expected_macs"], train[-1]["expected_macs"]
    assert first > 0.9 and abs(last - 0.3) < abs(first - 0.3) / 2
    assert train[-1]["target_macs"] == pytest.approx(0.3)
    # without the Lagrangian (target = start) the cost stays where it was
    l0_off = L0Args(target_macs_ratio=0.999, l0_learning_rate=0.3, l0_warmup_fraction=0.25)
    run_l0(tiny_models, toy_triples, tmp_path / "b", l0_off, num_training_samples=256)
    assert records(tmp_path / "b", "train")[-1]["expected_macs"] > 0.8


def test_l0_resume_equals_straight_run(tiny_models, toy_triples, tmp_path):
    l0 = L0Args(target_macs_ratio=0.5, l0_learning_rate=0.2)
    _, straight = run_l0(tiny_models, toy_triples, tmp_path / "a", l0)
    _, half = run_l0(tiny_models, toy_triples, tmp_path / "b", l0, stop=3, num_checkpoint_samples=24)
    assert (half / "l0_gates.pt").exists()
    _, end = run_l0(tiny_models, toy_triples, tmp_path / "b", l0, num_checkpoint_samples=24,
                    checkpoint_dir=str(half))
    assert end.name == straight.name
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(end / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    pa = json.loads((straight / "pruning.json").read_text())
    pb = json.loads((end / "pruning.json").read_text())
    assert pa["kept_heads"] == pb["kept_heads"] and pa["kept_ffn"] == pb["kept_ffn"]


def test_script_refuses_two_kinds_of_target_in_one_error_line(tiny_models, toy_triples, tmp_path):
    import importlib

    script = importlib.import_module("03d_prune_l0")
    base = ["--model_tag", str(tiny_models["bert"]), "--train_triples_file", str(toy_triples),
            "--output_dir", str(tmp_path / "o"), "--num_training_samples", "32", "--batch_size", "8"]
    for extra, message in ((["--target_macs_ratio", "0.5", "--target_heads", "3"], "either"),
                           ([], "give a target"), (["--target_macs_ratio", "1.5"], "target_macs_ratio"),
                           (["--target_heads", "6", "--target_heads_per_layer", "2"], "not both"),
                           (["--target_heads_per_layer", "5"], "--target_heads_per_layer 5 in 3 layers is more "
                            "than the model has: 0 of its layers have that many heads (heads per layer: [4, 4, 4])"),
                           (["--target_heads_per_layer", "2", "--target_layers", "4"], "--target_layers 4")):
        with pytest.raises(SystemExit) as exit_info:
            script.main(base + extra)
        text = str(exit_info.value.code)
        assert text.startswith("error:") and message in text and "\n" not in text
    assert not (tmp_path / "o").exists()  # nothing written


def test_importance_init_ranks_the_gates_and_starts_at_the_target(tiny_models, toy_triples, tmp_path):
    """--l0_init importance: head and neuron log-alphas follow the activation importance of the
    stage's first pairs (rank for rank, INIT_SPREAD apart), and the expected cost starts at the
    target (--l0_init_cost target) or where the constant start is (full)."""
    from common.pruning.importance import ActivationImportance
    from common.pruning.l0 import INIT_SPREAD

    def started(out, **kw):
        callback = L0Callback(L0Args(target_macs_ratio=0.4, l0_init_pairs=32, **kw))
        trainer = Trainer(l0_args(tiny_models, toy_triples, tmp_path / out), "l0", callback.schedule, callback)
        return trainer, callback

    trainer, callback = started("a", l0_init="importance")
    assert callback.start["macs"] == pytest.approx(0.4, abs=1e-4)
    assert callback.gates.ratio_with_offset(0.0) == pytest.approx(0.4, abs=1e-4)
    # the same scores, computed here: rank order of the log-alphas is the importance order
    from common.data.formats import TriplesStream
    rows = list(TriplesStream(toy_triples))[:16]
    scorer = ActivationImportance(trainer.state)
    callback.hooks.remove()  # the gates off: the model the importance was scored on
    model = trainer.model.eval()
    with torch.no_grad():
        for i in range(0, 16, 4):
            scorer.observe(model, trainer.training_kind.forward(model, rows[i:i + 4], ()).batch)
    for scores, log_alpha in ((scorer.head_scores(), callback.gates.head), (scorer.ffn_scores(), callback.gates.ffn)):
        scores, log_alpha = torch.tensor(scores).flatten(), log_alpha.detach().flatten()
        assert torch.equal(torch.argsort(scores, stable=True), torch.argsort(log_alpha, stable=True))
        assert float(log_alpha.max() - log_alpha.min()) == pytest.approx(INIT_SPREAD, abs=1e-4)
    _, constant = started("b")
    _, full = started("c", l0_init="importance", l0_init_cost="full")
    assert full.start["macs"] == pytest.approx(constant.start["macs"], abs=1e-4) and constant.start["macs"] > 0.9


def test_target_ramp_reaches_the_target_by_the_end_of_the_ramp(tiny_models, tmp_path):
    """--target_ramp 0.2 from the full cost: the expected cost is within 1 % of the target from
    the end of the ramp on (the train event after it logs the cost the next update starts
    from); the Lagrangian alone (--l0_warmup_fraction 0.2) is still far from it there."""
    from conftest import write_toy_triples

    triples = write_toy_triples(tmp_path / "t.tsv", n=128)
    ramp = L0Args(target_macs_ratio=0.4, l0_learning_rate=0.05, l0_init="importance", l0_init_cost="full",
                  target_ramp=0.2)
    trainer, last = run_l0(tiny_models, triples, tmp_path / "ramp", ramp, num_training_samples=160)
    train = records(tmp_path / "ramp", "train")
    end = round(0.2 * trainer.total_steps)  # step index where the target is reached
    assert train[0]["expected_macs"] > 0.9 and train[end]["target_macs"] == pytest.approx(0.4)
    for record in train[end:]:
        assert abs(record["expected_macs"] - 0.4) <= 0.01 * 0.4, record
    # in between, the cost follows the ramp's schedule
    for record in train[1:end]:
        assert record["expected_macs"] == pytest.approx(record["target_macs"], abs=1e-3)
    lagging = L0Args(target_macs_ratio=0.4, l0_learning_rate=0.05, l0_warmup_fraction=0.2)
    run_l0(tiny_models, triples, tmp_path / "plain", lagging, num_training_samples=160)
    assert abs(records(tmp_path / "plain", "train")[end]["expected_macs"] - 0.4) > 0.01 * 0.4
    assert json.loads((last / "pruning.json").read_text())["history"][-1]["l0"]["macs_ratio"] <= 0.4


def test_importance_init_and_ramp_resume_exactly(tiny_models, toy_triples, tmp_path):
    l0 = L0Args(target_macs_ratio=0.5, l0_learning_rate=0.2, l0_init="importance", l0_init_cost="full",
                target_ramp=0.2, l0_init_pairs=32)
    _, straight = run_l0(tiny_models, toy_triples, tmp_path / "a", l0)
    _, half = run_l0(tiny_models, toy_triples, tmp_path / "b", l0, stop=3, num_checkpoint_samples=24)
    _, end = run_l0(tiny_models, toy_triples, tmp_path / "b", l0, num_checkpoint_samples=24,
                    checkpoint_dir=str(half))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(end / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    pa = json.loads((straight / "pruning.json").read_text())
    pb = json.loads((end / "pruning.json").read_text())
    assert pa["kept_heads"] == pb["kept_heads"] and pa["kept_ffn"] == pb["kept_ffn"]


def test_warm_start_and_ramp_need_a_cost_target():
    with pytest.raises(ValueError, match="--l0_init importance works on a cost target"):
        L0Args(target_heads=4, l0_init="importance")
    with pytest.raises(ValueError, match="--target_ramp works on a cost target"):
        L0Args(target_heads=4, target_ramp=0.2)
    with pytest.raises(ValueError, match="--l0_init must be one of"):
        L0Args(target_macs_ratio=0.5, l0_init="magnitude")
def latency_table(heads=4, ffn=37, layers=3) -> dict:
    """A synthetic table whose layer cost is exactly 2 + 3 * heads + 0.5 * neurons ms over a 10 ms base
    (a linear cost the fit recovers; a head costs 6 neurons here, unlike in MACs)."""
    grid_h, grid_f = [0, heads // 2, heads], [0, ffn // 2, ffn]
    cost = [[(2 + 3 * h + 0.5 * f) if (h or f) else 0.0 for f in grid_f] for h in grid_h]
    return {"backend": "torch", "host": "test", "batch": 8, "lengths": [32], "heads": grid_h, "ffn": grid_f,
            "num_heads": heads, "ffn_size": ffn, "layers": layers, "base_ms": [10.0],
            "measured_ms": [[[10.0 + c for c in row] for row in cost]]}


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_final_masks_meet_a_latency_target(ratio):
    from common.evaluation.latency import linear_costs

    base, per_layer, per_head, per_neuron = linear_costs(latency_table(), 32)
    assert (base, per_layer, per_head, per_neuron) == pytest.approx((10, 2, 3, 0.5))
    gates = random_gates(latency=(base, per_layer, per_head, per_neuron))
    heads, ffn = gates.final_masks(L0Args(target_latency_ratio=ratio, latency_table="t.json"))
    cost = gates.cost_base + per_head * sum(map(len, heads)) + per_neuron * sum(map(len, ffn))
    assert cost <= ratio * gates.cost_full < cost + max(per_head, per_neuron)
    assert gates.full_macs == random_gates().full_macs  # the MAC accounting is untouched
    with pytest.raises(ValueError, match="go together"):
        L0Args(target_latency_ratio=0.5)
    with pytest.raises(ValueError, match="not both"):
        L0Args(target_latency_ratio=0.5, latency_table="t.json", target_macs_ratio=0.5)


def test_l0_stage_meets_a_latency_target(tiny_models, toy_triples, tmp_path):
    table = tmp_path / "table.json"
    table.write_text(json.dumps(latency_table()))
    l0 = L0Args(target_latency_ratio=0.5, latency_table=str(table), l0_learning_rate=0.2, l0_warmup_fraction=0.5)
    _, last = run_l0(tiny_models, toy_triples, tmp_path / "a", l0)
    event = json.loads((last / "pruning.json").read_text())["history"][-1]["l0"]
    assert event["targets"] == {"latency": 0.5}
    assert 0 < event["predicted_latency_ratio"] <= 0.5 + 1e-6  # the table's own (bilinear) prediction
    assert "expected_latency" in records(tmp_path / "a", "train")[-1]
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(latency_table(heads=12, ffn=1536)))
    with pytest.raises(ValueError, match="wrong.json: a table of layers with 12 heads"):
        run_l0(tiny_models, toy_triples, tmp_path / "b", L0Args(target_latency_ratio=0.5, latency_table=str(wrong)))
