"""03c to a predicted-time target (--target_latency_ratio --latency_table): the shape chosen meets
the ratio on the table's grid, skips what saves multiply-adds but not time, the cycles reach it,
a resumed run equals the straight one, and bad input is one error line."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from common.evaluation import latency
from common.evaluation.cost import analytic_macs
from common.pruning.cycles import PruneArgs, PruneCallback
from common.pruning.latency_shape import choose_shape
from common.training.loop import TrainArgs, Trainer
from conftest import straight_and_resumed
from test_hostile import assert_refused

prune_mixed = importlib.import_module("03c_prune_mixed").main
prune_ffn = importlib.import_module("03b_prune_intermediates").main

HEAD_GRID, FFN_GRID = [0, 2, 4], [0, 16, 24, 32, 37]
FFN_MS = {0: 0.0, 16: 1.6, 24: 3.5, 32: 3.2, 37: 4.0}  # 24 (off the tile sizes) is slower than 32


def attention_ms(heads: int) -> float:
    return 2.0 if heads else 0.0  # flat: 2 heads cost what 4 do, only an empty block saves time


def synthetic_table(**change) -> dict:
    """The tiny BERT's layer (4 heads, FFN 37, 3 layers) on a backend whose attention time does
    not shrink with heads and whose FFN width 24 is slower than 32; twice the time at length 32."""
    lengths, base = [16, 32], [1.0, 2.0]
    measured = [[[base[k] + (k + 1) * (attention_ms(h) + FFN_MS[f]) for f in FFN_GRID] for h in HEAD_GRID]
                for k in range(2)]
    table = {"backend": "openvino", "host": "test host", "batch": 8, "lengths": lengths, "heads": HEAD_GRID,
             "ffn": FFN_GRID, "num_heads": 4, "ffn_size": 37, "layers": 3, "base_ms": base, "measured_ms": measured}
    table.update(change)
    return table


def write_table(path, **change):
    path.write_text(json.dumps(synthetic_table(**change)))
    return path


def test_shape_meets_the_ratio_on_the_grid_and_differs_from_the_mac_choice(tmp_path):
    from common.pruning.latency_shape import LatencyCost

    cost = LatencyCost(str(write_table(tmp_path / "t.json")), 4, 37, 32)
    table = cost.table
    heads = [[0.9, 0.8, 0.7, 0.6], [0.05, 0.9, 0.04, 0.8], [0.5, 0.6, 0.7, 0.8]]  # layer 1: two idle heads
    ffn = torch.rand(3, 37, generator=torch.Generator().manual_seed(0)).add(0.01).tolist()
    kept_h, kept_f = [list(range(4))] * 3, [list(range(37))] * 3
    chosen = choose_shape(heads, ffn, kept_h, kept_f, [1, 2], cost.layer, cost.base, cost.full, 0.85,
                          cost.head_grid, cost.ffn_grid)
    ratio = latency.predicted_ratio(table, chosen["heads_per_layer"], chosen["ffn_per_layer"], 32)
    assert ratio <= 0.85 and chosen["predicted_ratio"] == pytest.approx(ratio, abs=1e-6)
    assert chosen["heads_per_layer"] == [4, 4, 4]  # fewer heads save no time here: none go
    assert chosen["ffn_per_layer"][0] == 37  # layer 0 held out
    assert all(f in (16, 32) for f in chosen["ffn_per_layer"][1:])  # on the grid, never the slow 24
    assert chosen["ffn_per_layer"] != [37, 37, 37]

    # the same greedy on multiply-adds, unit by unit: it takes the idle heads first
    def macs(h, f):
        return analytic_macs(32, 8, [h], [f], 32, head="none")
    base = analytic_macs(32, 8, [], [], 32)
    mac = choose_shape(heads, ffn, kept_h, kept_f, [1, 2], macs, base, base + 3 * macs(4, 37), 0.85,
                       list(range(5)), list(range(38)))
    assert mac["heads_per_layer"][1] < 4 and mac["heads_per_layer"] != chosen["heads_per_layer"]
    assert latency.predicted_ratio(table, mac["heads_per_layer"], mac["ffn_per_layer"], 32) > 0.85  # misses the time
    # an empty layer is a move only with allow_empty_layers (floor 0): then a lower ratio is reachable
    with pytest.raises(ValueError, match="cannot be met"):
        choose_shape(heads, ffn, kept_h, kept_f, [1, 2], cost.layer, cost.base, cost.full, 0.6,
                     cost.head_grid, cost.ffn_grid)
    empty = choose_shape(heads, ffn, kept_h, kept_f, [1, 2], cost.layer, cost.base, cost.full, 0.6,
                         cost.head_grid, cost.ffn_grid, floor=0)
    assert latency.predicted_ratio(table, empty["heads_per_layer"], empty["ffn_per_layer"], 32) <= 0.6


def train_args(tiny_models, triples, out, **kw):
    base = dict(train_triples_file=str(triples), output_dir=str(out), num_training_samples=48,
                model_tag=str(tiny_models["bert"]), batch_size=8, max_length=32, learning_rate=5e-4, seed=5,
                threads=1)
    base.update(kw)
    return TrainArgs(**base)


@pytest.mark.parametrize("cycles,ratio,empty", [(1, 0.85, False),  # resumed before the shape is chosen
                                                (2, 0.85, False),  # after it
                                                (2, 0.5, True)])  # heads go too (a whole attention block)
def test_cycles_reach_the_shape_and_resume_equals_straight_run(cycles, ratio, empty, tiny_models, toy_triples,
                                                               tmp_path):
    table = write_table(tmp_path / "table.json")
    prune = PruneArgs(target_latency_ratio=ratio, latency_table=str(table), num_prune_cycles=cycles,
                      allow_empty_layers=empty)

    def run(out, every=0, checkpoint_dir=None, stop=None):
        callback = PruneCallback("mixed", prune)
        trainer = Trainer(train_args(tiny_models, toy_triples, out, num_checkpoint_samples=every,
                                     checkpoint_dir=checkpoint_dir), "mixed", callback.schedule, callback)
        if stop:
            trainer.total_steps = stop
        return trainer.train()

    straight, end, a, b = straight_and_resumed(run, tmp_path)
    assert end.name == straight.name
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    pa, pb = (json.loads((d / "pruning.json").read_text()) for d in (straight, end))
    assert pa["kept_heads"] == pb["kept_heads"] and pa["kept_ffn"] == pb["kept_ffn"]
    assert pa["history"] == pb["history"]
    shape = pa["history"][0]["latency_shape"]
    assert len(pa["history"]) == cycles and all("latency_shape" not in e for e in pa["history"][1:])
    assert (pa["heads_per_layer"], pa["ffn_per_layer"]) == (shape["heads_per_layer"], shape["ffn_per_layer"])
    assert shape["heads_per_layer"][0] == 4 and shape["ffn_per_layer"][0] == 37  # layer 0 held out
    assert all(h in (HEAD_GRID if empty else [4]) for h in shape["heads_per_layer"])
    assert all(f in ([0, 16, 32] if empty else [16, 32]) for f in shape["ffn_per_layer"][1:])
    if empty:  # the attention block of a layer goes: the heads were removed by the cycles
        assert 0 in shape["heads_per_layer"] and any(e.get("heads") for e in pa["history"])
    predicted = latency.predicted_ratio(synthetic_table(), pa["heads_per_layer"], pa["ffn_per_layer"], 32)
    assert predicted <= ratio and shape["predicted_ratio"] == pytest.approx(predicted, abs=1e-6)
    assert shape["target_latency_ratio"] == ratio and shape["backend"] == "openvino" and shape["length"] == 32
    assert pa["history"][-1]["predicted_latency_ratio"] == pytest.approx(predicted, abs=1e-6)
    if cycles == 2:  # each event removes its share: part of the way after the first
        first = sum(len(v["neurons"]) for v in pa["history"][0]["ffn"].values())
        assert 0 < first < sum(37 - f for f in pa["ffn_per_layer"])
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if m["event"] == "latency_shape"]
    assert len(logged) == 1 and logged[0]["ffn_per_layer"] == shape["ffn_per_layer"]
    assert [m["predicted_latency_ratio"] for m in metrics if m["event"] == "prune"][-1] == \
        pytest.approx(predicted, abs=1e-6)


def test_bad_latency_targets_are_one_error_line(run, tmp_path):
    out, triples = run
    table = write_table(tmp_path / "table.json")
    new = tmp_path / "new"
    base = ["initial", "--checkpoint_dir", str(out / "seen_000000016"), "--train_triples_file", str(triples),
            "--output_dir", str(new), "--num_training_samples", "32", "--num_prune_cycles", "1",
            "--batch_size", "8", "--max_length", "32", "--threads", "1", "--device", "cpu"]
    assert_refused(prune_mixed, base + ["--target_latency_ratio", "0.5"], "--target_latency_ratio and --latency_table")
    assert_refused(prune_mixed, base + ["--latency_table", str(table)], "--target_latency_ratio and --latency_table")
    assert_refused(prune_mixed, base + ["--target_latency_ratio", "0.8", "--latency_table", str(table),
                                        "--target_heads", "8"], "--target_latency_ratio", "--target_heads", "not both")
    assert_refused(prune_mixed, base + ["--target_latency_ratio", "0.8", "--latency_table", str(table),
                                        "--target_ffn", "20"], "--target_ffn", "not both")
    for bad in ("0", "1.5", "nan"):
        assert_refused(prune_mixed, base + ["--target_latency_ratio", bad, "--latency_table", str(table)],
                       "--target_latency_ratio must be")
    assert_refused(prune_mixed, base + ["--target_latency_ratio", "0.8", "--latency_table", str(table),
                                        "--scope", "global"], "--scope global")
    # refused once the model is loaded, before anything is written
    broken = synthetic_table()
    del broken["measured_ms"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert_refused(prune_mixed, base + ["--target_latency_ratio", "0.8", "--latency_table",
                                        str(tmp_path / "broken.json")], "broken.json", "measured_ms")
    assert_refused(prune_mixed, base + ["--target_latency_ratio", "0.8", "--latency_table",
                                        str(tmp_path / "missing.json")], "missing.json", "not a readable latency table")
    other = write_table(tmp_path / "other.json", num_heads=8)
    assert_refused(prune_mixed, base + ["--target_latency_ratio", "0.8", "--latency_table", str(other)],
                   "other.json", "8 heads", "the model's have 4")
    assert_refused(prune_mixed, base + ["--target_latency_ratio", "0.5", "--latency_table", str(table)],
                   "--target_latency_ratio 0.5 cannot be met", "--allow_empty_layers")
    assert_refused(prune_ffn, base[1:] + ["--target_latency_ratio", "0.8", "--latency_table", str(table)],
                   "03c_prune_mixed.py")
    assert not new.exists()
