"""OpenVINO backends: 04 --openvino writes an IR that a stock ``openvino`` runtime (no slimrank on
the path) opens and that reproduces torch; the int8 IR is calibrated on training-side pairs and
its agreement recorded; a failed export leaves the previous one; ``auto`` chooses by measurement,
cached per host class."""
from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from common import layout  # noqa: E402
from common.data.formats import read_candidates_json  # noqa: E402
from common.hardware import machine_description  # noqa: E402
from common.kinds.loading import load_model  # noqa: E402
from common.serving import choose, openvino_export, rank, runners  # noqa: E402
from common.serving.onnx_export import export_onnx  # noqa: E402
from common.serving.rank import Ranker  # noqa: E402
from conftest import SHARED  # noqa: E402
from test_ship import PASSAGES, QUERIES, pruned_dir  # noqa: E402

needs_shared = pytest.mark.skipif(not (SHARED / "dl22" / "bm25.json").is_file(), reason="needs shared data")

STOCK_OPENVINO = r"""
import json, sys
try:
    import common  # noqa: F401
    sys.exit("slimrank is importable: the test would prove nothing")
except ImportError:
    pass
import numpy as np
import openvino
from transformers import AutoTokenizer
path, kind = sys.argv[1], sys.argv[2]
queries, passages = json.loads(sys.argv[3]), json.loads(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(path)
core = openvino.Core()
model = core.read_model(f"{path}/openvino/openvino_model.xml")
names = [i.get_any_name() for i in model.inputs]
if kind == "bi":
    batch = tokenizer(passages, padding=True, return_tensors="np")
else:
    batch = tokenizer(queries, passages, padding=True, truncation="only_second", return_tensors="np")
feed = {k: batch[k].astype(np.int64) for k in names}
out = {}
for precision in ("f32", None):
    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    compiled = core.compile_model(model, "CPU", config)
    out[precision or "default"] = compiled(feed)[0].tolist()
    if precision == "f32":  # what sentence-transformers' CrossEncoder(dir, backend="openvino") reads
        out["outputs"] = [sorted(o.get_names()) for o in model.outputs]
out["int8_outputs"] = [sorted(o.get_names())
                       for o in core.read_model(f"{path}/openvino/openvino_model_qint8_quantized.xml").outputs]
out["default_precision"] = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
print(json.dumps(out))
"""


def training_side_triples(path: Path, n: int = 48) -> Path:
    """(query, passage, passage) triples from DL22 candidate lists (training side, never DL20)."""
    cands = read_candidates_json(SHARED / "dl22" / "bm25.json")
    rows = []
    for _, group in cands.groupby("qid", sort=False):
        rows += [(group["query"].iloc[0], group["passage"].iloc[i], group["passage"].iloc[-1 - i]) for i in range(2)]
    path.write_text("".join("\t".join(r) + "\n" for r in rows[:n]))
    return path


@needs_shared
@pytest.mark.parametrize("family,role", [("bert", "classifier"), ("bert", "bi")])
def test_openvino_ir_opens_in_stock_runtime_and_matches_torch(family, role, tiny_models, tmp_path):
    main = importlib.import_module("04_reshape").main
    masked = pruned_dir(tiny_models, family, role, tmp_path).parent / "masked"
    out = tmp_path / "shipped"
    triples = training_side_triples(tmp_path / "triples.tsv")
    main(["--checkpoint_dir", str(masked), "--output_dir", str(out), "--openvino", "--max_length", "64",
          "--calibration_triples", str(triples), "--calibration_pairs", "32", "--held_out_triples", "16"]
         + (["--model_kind", "bi"] if role == "bi" else []))
    assert (out / "onnx" / "model.onnx").is_file()  # --openvino implies the ONNX export it converts
    for name in ("openvino_model", "openvino_model_qint8_quantized"):
        assert (out / "openvino" / f"{name}.xml").is_file() and (out / "openvino" / f"{name}.bin").is_file()
    info = json.loads((out / "openvino" / "export.json").read_text())
    assert info["openvino"]["max_abs_diff_vs_torch"]["f32"] <= 1e-4
    int8 = info["openvino-int8"]
    assert int8["calibration_pairs"] == 32 and int8["held_out"]["triples"] == 16
    assert int8["calibration_file"] == str(triples)
    assert 0 <= int8["held_out"]["order_agreement"] <= 1 and int8["held_out"]["max_abs_diff_vs_torch"] > 0

    done = subprocess.run([sys.executable, "-I", "-c", STOCK_OPENVINO, str(out), role,
                           json.dumps(QUERIES), json.dumps(PASSAGES)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stock = json.loads(done.stdout.strip().splitlines()[-1])
    ours = Ranker.load(str(out), "torch", kind="bi" if role == "bi" else None)
    expected = ours.encode(PASSAGES) if role == "bi" else ours.score(QUERIES, PASSAGES)
    np.testing.assert_allclose(np.array(stock["f32"]), expected, atol=1e-4)
    # an embedding graph, a two-label classifier's score: the one output (one-label scorers: the test below)
    assert stock["outputs"] == stock["int8_outputs"] == [["output"]] and info["logits"] is None
    bound = 1e-4 if stock["default_precision"] == "f32" else 1e-2
    np.testing.assert_allclose(np.array(stock["default"]), expected, atol=bound)

    # the backends through the ranking API: openvino as torch, int8 close but not the same graph
    scores = {b: Ranker.load(str(out), b, max_length=64).score(QUERIES, PASSAGES)
              for b in ("torch", "openvino", "openvino-int8")}
    np.testing.assert_allclose(scores["openvino"], scores["torch"], atol=bound)
    assert np.isfinite(scores["openvino-int8"]).all() and not np.array_equal(scores["openvino-int8"],
                                                                             scores["openvino"])
    row = rank.describe_backend(out, "openvino")
    assert row["backend_precision"] == stock["default_precision"] and row["backend_host"] == machine_description()
    assert "NNCF" in rank.describe_backend(out, "openvino-int8")["export"]


@needs_shared
def test_one_label_scorer_ir_has_the_logits_sentence_transformers_reads(tmp_path):
    """A one-label re-ranker's IRs (fp32/bf16 and NNCF int8) carry ``logits`` [batch, 1] beside
    slimrank's ``output`` [batch]: the output sentence-transformers' CrossEncoder(dir,
    backend="openvino") reads through optimum-intel (checked by hand with sentence-transformers 6.2,
    optimum-intel 2.2: results/latency/README.md); slimrank's runner still reads the score."""
    import openvino
    import torch
    from transformers import AutoModelForSequenceClassification

    from conftest import tiny_config
    from test_byo import _tokenizer

    config = tiny_config("bert")
    config.num_labels = 1
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "one")
    _tokenizer().save_pretrained(tmp_path / "one")
    out = tmp_path / "shipped"
    importlib.import_module("04_reshape").main([
        "--checkpoint_dir", str(tmp_path / "one"), "--output_dir", str(out), "--openvino", "--max_length", "64",
        "--calibration_triples", str(training_side_triples(tmp_path / "triples.tsv")), "--calibration_pairs", "32",
        "--held_out_triples", "16"])
    assert json.loads((out / "openvino" / "export.json").read_text())["logits"]
    ours = Ranker.load(str(out), "torch", max_length=64)
    tokens = ours.loaded.tokenizer(QUERIES, PASSAGES, padding=True, truncation="only_second", return_tensors="np")
    core = openvino.Core()
    for name, atol in (("openvino_model", 1e-4), ("openvino_model_qint8_quantized", None)):
        model = core.read_model(str(out / "openvino" / f"{name}.xml"))
        assert [sorted(o.get_names()) for o in model.outputs] == [["output"], ["logits"]]
        feed = {i.get_any_name(): tokens[i.get_any_name()].astype(np.int64) for i in model.inputs}
        got = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(feed)
        assert got["logits"].shape == (len(QUERIES), 1)
        np.testing.assert_array_equal(got["logits"][:, 0], got["output"])
        if atol:
            np.testing.assert_allclose(got["output"], ours.score(QUERIES, PASSAGES), atol=atol)
    np.testing.assert_allclose(Ranker.load(str(out), "openvino", max_length=64).score(QUERIES, PASSAGES),
                               ours.score(QUERIES, PASSAGES), atol=1e-2)


def test_openvino_export_refuses_and_keeps_the_previous_one(tiny_models, tmp_path, monkeypatch):
    out = pruned_dir(tiny_models, "bert", "classifier", tmp_path)
    loaded = load_model(str(out))
    with pytest.raises(ValueError, match="no ONNX graph"):
        openvino_export.export_openvino(loaded, out, max_length=64)
    assert not (out / "openvino").exists() and not list(out.glob(".tmp-*"))
    with pytest.raises(ValueError, match="04_reshape.py --openvino"):
        Ranker.load(str(out), "openvino")
    export_onnx(loaded, out, max_length=64)
    first = openvino_export.export_openvino(loaded, out, max_length=64)
    assert "openvino-int8" not in first  # no calibration pairs: no int8 IR
    before = (out / "openvino" / "openvino_model.xml").read_bytes()
    monkeypatch.setattr(openvino_export, "MAX_ABS_DIFF_FP32", -1.0)  # every export now fails its check
    with pytest.raises(ValueError, match="differs from PyTorch"):
        openvino_export.export_openvino(loaded, out, max_length=64)
    assert (out / "openvino" / "openvino_model.xml").read_bytes() == before
    assert not list(out.glob(".tmp-*"))


def test_auto_measures_once_per_host_class_and_takes_the_fastest(tiny_models, tmp_path, monkeypatch):
    """The fastest measured backend is chosen; the cache in the dir is reused on the same host
    key; another host key (or a changed export) measures again; a dir without exports is torch."""
    out = pruned_dir(tiny_models, "bert", "classifier", tmp_path)
    export_onnx(load_model(str(out)), out, max_length=64)
    assert rank.resolve_backend(tiny_models["bert"], "auto") == "torch"  # no export: fp32 everywhere
    speeds = {"torch": 50.0, "torch-bf16": 30.0, "onnx": 40.0, "onnx-int8": 10.0}
    calls = []

    def fake_measure(loaded, backend, batch):
        calls.append(backend)
        assert batch["input_ids"].shape == (choose.BATCH, choose.LENGTH)
        return speeds[backend]

    monkeypatch.setattr(choose, "measure_backend", fake_measure)
    monkeypatch.setattr(choose, "host_key", lambda: "host A")
    assert rank.resolve_backend(out, "auto") == "onnx-int8"
    measured = sorted(calls)
    assert set(measured) >= {"torch", "onnx", "onnx-int8"}
    cache = json.loads((out / layout.BACKEND_CHOICE_FILE).read_text())
    assert cache["host A"]["backend"] == "onnx-int8" and sorted(cache["host A"]["ms"]) == measured
    assert rank.resolve_backend(out, "auto") == "onnx-int8" and sorted(calls) == measured  # cached
    speeds["onnx-int8"], speeds["onnx"] = 90.0, 5.0  # another host class: its own measurement
    monkeypatch.setattr(choose, "host_key", lambda: "host B")
    assert rank.resolve_backend(out, "auto") == "onnx" and len(calls) == 2 * len(measured)
    monkeypatch.setattr(choose, "host_key", lambda: "host A")
    assert Ranker.load(str(out), "auto").backend == "onnx-int8"  # host A's entry kept beside B's
    assert set(json.loads((out / layout.BACKEND_CHOICE_FILE).read_text())) == {"host A", "host B"}
    shutil.copy(out / "onnx" / "model.onnx", out / "onnx" / "model_int8.onnx")  # the exports changed
    assert rank.resolve_backend(out, "auto") == "onnx" and len(calls) == 3 * len(measured)


def test_measure_backend_times_a_real_runner(tiny_models, tmp_path):
    out = pruned_dir(tiny_models, "bert", "bi", tmp_path)
    loaded = load_model(str(out), kind="bi")
    batch = choose.benchmark_batch(loaded.tokenizer, runners.onnx_inputs(loaded))
    assert choose.measure_backend(loaded, "torch", batch) > 0
