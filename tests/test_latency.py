"""The latency table: the predictor interpolates the grid it reads (bilinear in heads and FFN
width, linear in length), refuses a malformed table naming the field, and bench/latency_table.py
writes a table with the host that the predictor reads."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from common.evaluation import latency
from common.hardware import machine_description

ROOT = Path(__file__).resolve().parents[1]


def synthetic_table() -> dict:
    """Layer cost = 1 + 0.5 * heads + 0.01 * ffn (ms over the base) at length 64, twice at 128."""
    heads, ffn, lengths = [0, 2, 4], [0, 100, 200], [64, 128]
    base = [3.0, 5.0]
    measured = [[[base[k] + (k + 1) * (0.5 * h + 0.01 * f + (1.0 if h or f else 0.0)) for f in ffn] for h in heads]
                for k in range(2)]
    return {"backend": "torch", "host": "test", "batch": 8, "lengths": lengths, "heads": heads, "ffn": ffn,
            "num_heads": 4, "ffn_size": 200, "layers": 3, "base_ms": base, "measured_ms": measured}


def test_predictor_interpolates_the_grid():
    table = synthetic_table()
    # a grid point: exact; between points: bilinear (the synthetic cost is linear off the origin)
    assert latency.predict_ms(table, [4], [200], 64) == pytest.approx(3 + 1 + 2 + 2)
    assert latency.predict_ms(table, [3], [150], 64) == pytest.approx(3 + 1 + 1.5 + 1.5)
    # three layers add their costs to one base; length halfway: the mean of the two lengths
    full64, full128 = 3 + 3 * 5.0, 5 + 3 * 10.0
    assert latency.predict_ms(table, [4] * 3, [200] * 3, 64) == pytest.approx(full64)
    assert latency.predict_ms(table, [4] * 3, [200] * 3, 96) == pytest.approx((full64 + full128) / 2)
    assert latency.predict_ms(table, [4] * 3, [200] * 3) == pytest.approx(full128)  # default: longest
    assert latency.predict_ms(table, [9], [900], 512) == latency.predict_ms(table, [4], [200], 128)  # clamped
    assert latency.predicted_ratio(table, [4] * 3, [200] * 3) == pytest.approx(1.0)
    pruned = latency.predicted_ratio(table, [2, 0, 4], [100, 0, 200], 64)
    assert pruned == pytest.approx((3 + (1 + 1 + 1) + 0 + 5) / full64)
    with pytest.raises(ValueError, match="2 head counts but 1 FFN widths"):
        latency.predict_ms(table, [1, 2], [3])


def test_the_time_no_layer_owns_is_a_fixed_cost_of_every_shape():
    """whole_model_ms beyond the additive prediction of the reference: added to every shape's
    prediction (interpolated in length), so the reference is predicted as measured and a pruned
    shape's ratio is not flattered; the 03c shape chooser and L0's linear costs see it too."""

    table = synthetic_table()
    full64, full128 = 3 + 3 * 5.0, 5 + 3 * 10.0
    table["whole_model_ms"] = [full64 + 2.0, full128 + 6.0]
    assert latency.residual_ms(table, 64) == pytest.approx(2.0)
    assert latency.residual_ms(table, 96) == pytest.approx(4.0)
    assert latency.residual_ms(table) == pytest.approx(6.0)  # default: the longest length
    assert latency.predict_ms(table, [4] * 3, [200] * 3, 128) == pytest.approx(full128 + 6.0)
    assert latency.additive_ms(table, [4] * 3, [200] * 3, 128) == pytest.approx(full128)
    pruned = ([2, 0, 4], [100, 0, 200])
    ratio = latency.predicted_ratio(table, *pruned, 64)
    assert ratio == pytest.approx((3 + 3 + 0 + 5 + 2.0) / (full64 + 2.0))
    assert ratio > latency.additive_ms(table, *pruned, 64) / full64  # the fixed cost does not shrink
    assert latency.predicted_speedup(table, ([4] * 3, [200] * 3), pruned, 64) == pytest.approx(1 / ratio)
    base, _c, _a, _b = latency.linear_costs(table, 64)
    assert base == pytest.approx(3 + 2.0)
    no_whole = synthetic_table()
    assert latency.residual_ms(no_whole, 64) == 0.0 and latency.linear_costs(no_whole, 64)[0] == pytest.approx(3)
    table["whole_model_ms"] = [1.0, 1.0]  # far below the additive model: never more than half the base off
    assert latency.residual_ms(table, 64) == pytest.approx(-1.5)


def test_the_shape_chooser_costs_include_the_residual(tmp_path):
    from common.pruning.latency_shape import LatencyCost

    table = synthetic_table()
    table["whole_model_ms"] = [3 + 3 * 5.0 + 2.0, 5 + 3 * 10.0 + 6.0]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    cost = LatencyCost(str(path), 4, 200, 64)
    assert cost.base == pytest.approx(3 + 2.0) and cost.layer(4, 200) == pytest.approx(5.0)
    assert cost.ratio([2, 0, 4], [100, 0, 200]) == pytest.approx(latency.predicted_ratio(table, [2, 0, 4], [100, 0, 200], 64))


def test_load_table_refuses_a_malformed_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="t.json: not a readable latency table"):
        latency.load_table(path)
    table = synthetic_table()
    del table["base_ms"]
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match="without field.*base_ms"):
        latency.load_table(path)
    table = synthetic_table()
    table["measured_ms"][1] = table["measured_ms"][1][:2]
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=r"measured_ms\[1\]: shape \(2, 3\), expected \(3, 3\)"):
        latency.load_table(path)
    path.write_text(json.dumps(synthetic_table()))
    assert latency.load_table(path)["heads"] == [0, 2, 4]


def _script():
    spec = importlib.util.spec_from_file_location("latency_table", ROOT / "bench" / "latency_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_latency_table_script_writes_what_the_predictor_reads(backend, tiny_models, tmp_path, capsys):
    if backend == "openvino":
        pytest.importorskip("openvino")
    out = tmp_path / "table.json"
    _script()(["--model", str(tiny_models["bert"]), "--backend", backend, "--heads", "0", "4", "--ffn", "0", "37",
               "--lengths", "16", "32", "--batch", "4", "--rounds", "1", "--threads", "1", "--out", str(out)])
    table = latency.load_table(out)
    assert table["host"] == machine_description() and table["backend"] == backend and table["threads"] == 1
    assert (table["layers"], table["num_heads"], table["ffn_size"]) == (3, 4, 37)
    assert np.shape(table["measured_ms"]) == (2, 2, 2) and np.all(np.asarray(table["measured_ms"]) > 0)
    assert table["base_ms"] == [table["measured_ms"][k][0][0] for k in range(2)]
    assert table["predicted_whole_model_ms"] == pytest.approx(
        [latency.additive_ms(table, [4] * 3, [37] * 3, n) for n in (16, 32)])
    # with the residual, the reference model is predicted as it was measured
    assert [latency.predict_ms(table, [4] * 3, [37] * 3, n) for n in (16, 32)] == pytest.approx(
        [max(w, p - 0.5 * b) for w, p, b in zip(table["whole_model_ms"], table["predicted_whole_model_ms"],
                                                table["base_ms"])])
    assert all(m > 0 for m in table["whole_model_ms"])
    with pytest.raises(SystemExit):
        _script()(["--model", str(tiny_models["bert"]), "--backend", backend, "--heads", "2", "4",
                   "--out", str(tmp_path / "x.json")])
    assert "--heads must be increasing and start at 0" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_speedup_bench_holds_the_measured_speed_up_against_the_table(tiny_models, tmp_path, capsys):
    """bench/speedup.py --latency_table: the candidate's predicted speed-up over the baseline (from
    each model's own per-layer shape) and measured / predicted; a table of another backend is named."""
    table = synthetic_table()
    table.update(layers=3, num_heads=4, ffn_size=37, heads=[0, 2, 4], ffn=[0, 20, 37])
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    spec = importlib.util.spec_from_file_location("speedup", ROOT / "bench" / "speedup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = str(tiny_models["bert"])
    module.main(["--baseline", model, "--candidate", model, "--rounds", "2", "--max_length", "16",
                 "--threads", "1", "--latency_table", str(path)])
    out = capsys.readouterr().out
    predicted = latency.predicted_speedup(table, ([4] * 3, [37] * 3), ([4] * 3, [37] * 3), 16)
    assert predicted == pytest.approx(1.0)
    line = next(x for x in out.splitlines() if x.startswith("predicted"))
    assert line.startswith("predicted 1.00x") and "measured / predicted" in line and "not comparable" not in line
    assert latency.predicted_speedup(table, ([4] * 3, [37] * 3), ([2, 0, 4], [20, 0, 37]), 64) == pytest.approx(
        latency.predict_ms(table, [4] * 3, [37] * 3, 64) / latency.predict_ms(table, [2, 0, 4], [20, 0, 37], 64))
    table["backend"] = "openvino"
    path.write_text(json.dumps(table))
    module.main(["--baseline", model, "--candidate", model, "--rounds", "2", "--max_length", "16",
                 "--threads", "1", "--latency_table", str(path)])
    assert "not comparable: the table is of backend openvino, these run on torch" in capsys.readouterr().out
    path.write_text("{}")
    with pytest.raises(SystemExit, match="error: --latency_table: .*without field"):
        module.main(["--baseline", model, "--candidate", model, "--latency_table", str(path)])


def test_onnx_int8_table_keeps_the_shipped_fp32_projections(tiny_models, tmp_path, capsys):
    """--int8_keep_fp32 times the int8 graphs as 04 --int8_keep_fp32 ships them, recorded in the
    table; asked of another backend it is refused before anything is measured or written."""
    out = tmp_path / "int8.json"
    _script()(["--model", str(tiny_models["bert"]), "--backend", "onnx-int8", "--heads", "0", "4", "--ffn", "0", "37",
               "--lengths", "16", "--batch", "2", "--rounds", "1", "--threads", "1", "--int8_keep_fp32", "ffn_out",
               "--out", str(out)])
    table = latency.load_table(out)
    assert table["int8_keep_fp32"] == ["ffn_out"] and table["backend"] == "onnx-int8"
    assert np.all(np.asarray(table["measured_ms"]) > 0)
    with pytest.raises(SystemExit):
        _script()(["--model", str(tiny_models["bert"]), "--backend", "torch", "--int8_keep_fp32", "ffn_out",
                   "--out", str(tmp_path / "y.json")])
    assert "--int8_keep_fp32 shapes onnx-int8 graphs; --backend is torch" in capsys.readouterr().err
    assert not (tmp_path / "y.json").exists()
    with pytest.raises(ValueError, match="int8_keep_fp32 shapes onnx-int8 graphs"):
        latency.measure_table(str(tiny_models["bert"]), None, "onnx", [0, 4], [0, 37], [16], 2, 1, 1,
                              keep_fp32=("ffn_out",))


def test_openvino_int8_table_calibrates_every_point_as_the_shipped_ir(tiny_models, toy_triples, tmp_path, capsys):
    """--backend openvino-int8: every grid point's IR is NNCF-quantized on the calibration pairs (their
    number and file recorded); without --calibration_triples, or with them for another backend, it is
    refused before anything is measured or written."""
    pytest.importorskip("nncf")
    out = tmp_path / "ov-int8.json"
    _script()(["--model", str(tiny_models["bert"]), "--backend", "openvino-int8", "--heads", "0", "4", "--ffn", "0",
               "37", "--lengths", "16", "--batch", "2", "--rounds", "1", "--threads", "1", "--calibration_triples",
               str(toy_triples), "--calibration_pairs", "8", "--out", str(out)])
    table = latency.load_table(out)
    assert table["backend"] == "openvino-int8" and table["precision"].startswith("int8 (NNCF static)")
    assert table["calibration_pairs"] == 8 and table["calibration_file"] == str(toy_triples)
    assert np.all(np.asarray(table["measured_ms"]) > 0) and all(m > 0 for m in table["whole_model_ms"])
    for argv, needle in ((["--backend", "openvino-int8"], "--calibration_triples goes with --backend openvino-int8"),
                         (["--backend", "openvino", "--calibration_triples", str(toy_triples)], "--calibration_triples")):
        with pytest.raises(SystemExit):
            _script()(["--model", str(tiny_models["bert"]), *argv, "--out", str(tmp_path / "z.json")])
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "z.json").exists()
    with pytest.raises(ValueError, match="calibration pairs go with the openvino-int8 backend"):
        latency.measure_table(str(tiny_models["bert"]), None, "openvino-int8", [0, 4], [0, 37], [16], 2, 1, 1)
