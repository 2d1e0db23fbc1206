"""OpenVINO export of a shipped dir: ``<dir>/openvino/openvino_model.xml/.bin`` (and the int8
``openvino_model_qint8_quantized.xml/.bin``), where sentence-transformers' OpenVINO backend
looks for them.

The IR is converted from the ONNX graph ``04_reshape.py --onnx`` writes (``onnx/model.onnx``:
:class:`common.serving.runners.RankingOutput`, so its output is the relevance score of each pair or
the normalised embedding of each text, as the ONNX graph's), with fp32 weights. Before it is
kept it is run on the sample inputs of the ONNX export: in fp32 within ``MAX_ABS_DIFF_FP32`` of
PyTorch fp32, and at the CPU's default inference precision (bf16 where the CPU has native bf16)
within ``MAX_ABS_DIFF_BF16``. The int8 IR is NNCF's static post-training quantization
(``nncf.quantize``, transformer model type: int8 weights and activations, activation ranges
calibrated once) on training-side pairs, never evaluation topics; its agreement with torch fp32
on held-out training-side triples (pairs the calibration did not see) is measured and recorded.
``export.json`` records recipes, versions, calibration and measured differences. Everything is
written to a temporary directory and renamed; on any failure nothing is left.

A pair scorer with one label also gets a second output, ``logits`` (``[batch, 1]``, the same
score): the name and shape sentence-transformers' ``CrossEncoder(dir, backend="openvino")`` reads
through optimum-intel's ``OVModelForSequenceClassification``. slimrank's runner reads the first.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from common.io import temporary_dir
from common.layout import ONNX_FILES, OPENVINO_FILES, onnx_dir, openvino_dir, replace_dir
from common.models.loading import encode_pairs
from common.kinds.loading import LoadedModel
from common.serving.onnx_export import sample_reference
from common.kinds import kind_of
from common.serving.rank import Ranker
from common.serving.runners import OpenVinoRunner, TorchRunner, onnx_inputs, openvino_precision

MAX_ABS_DIFF_FP32 = 1e-4  # the IR in fp32 vs PyTorch fp32 on the sample inputs
MAX_ABS_DIFF_BF16 = 1e-2  # the IR at a bf16 default precision vs PyTorch fp32


def calibration_items(loaded: LoadedModel, queries: list[str], passages: list[str],
                      max_length: int) -> list[dict[str, np.ndarray]]:
    """One unpadded input per calibration sequence, in the graph's input layout: each pair
    (cross), or each distinct query and passage alone (bi)."""
    names = onnx_inputs(loaded)
    if not kind_of(loaded.kind).pairs:
        texts = list(dict.fromkeys(list(passages) + list(queries)))
        rows = [loaded.tokenizer(t, truncation=True, max_length=max_length) for t in texts]
    else:
        features = encode_pairs(loaded.tokenizer, list(queries), list(passages), max_length, loaded.model,
                                padding=False)
        rows = [{k: features[k][i] for k in names} for i in range(len(queries))]
    return [{k: np.asarray(row[k], dtype=np.int64)[None, :] for k in names} for row in rows]


def add_logits_output(model) -> None:
    """Give a pair scorer's IR the output ``logits`` (``[batch, 1]``: its first output, the score,
    unsqueezed), as sequence-classification IRs name it; the first output stays first."""
    from openvino import opset13 as ops

    score = model.get_results()[0].input_value(0)
    logits = ops.unsqueeze(score, ops.constant(np.array([1], dtype=np.int64)))
    logits.output(0).get_tensor().set_names({"logits"})
    model.add_results([ops.result(logits)])
    model.validate_nodes_and_infer_types()


def _ranker(loaded: LoadedModel, runner, max_length: int):
    return Ranker(loaded, runner, "check", max_length, 32)


def agreement(loaded: LoadedModel, runner, triples: list[tuple[str, str, str]], max_length: int) -> dict:
    """A runner against torch fp32 on (query, positive, negative) triples: max and mean |score
    difference| over their pairs, and the share of triples whose two passages it orders as torch
    does (a tie counts as disagreement)."""
    queries = [t[0] for t in triples] * 2
    passages = [t[1] for t in triples] + [t[2] for t in triples]
    ref = _ranker(loaded, TorchRunner(loaded), max_length).score(queries, passages)
    got = _ranker(loaded, runner, max_length).score(queries, passages)
    n = len(triples)
    same = np.sign(ref[:n] - ref[n:]) == np.sign(got[:n] - got[n:])
    return {"triples": n, "max_abs_diff_vs_torch": float(np.abs(got - ref).max()),
            "mean_abs_diff_vs_torch": float(np.abs(got - ref).mean()),
            "order_agreement": float(same.mean())}


def export_openvino(loaded: LoadedModel, directory: str | Path, max_length: int = 256,
                    calibration: tuple[list[str], list[str]] | None = None,
                    held_out: list[tuple[str, str, str]] | None = None, calibration_file: str | None = None) -> dict:
    """Write ``directory/openvino/`` from ``directory/onnx/model.onnx``; returns its export.json.
    ``calibration``: (queries, passages) of training-side pairs: also writes the int8 IR;
    ``held_out``: training-side (query, positive, negative) triples apart from the calibration
    pairs, on which the int8 IR's agreement with torch fp32 is measured; ``calibration_file``:
    where both came from (recorded)."""
    import nncf
    import openvino

    directory = Path(directory)
    source = onnx_dir(directory) / ONNX_FILES["onnx"]
    if not source.is_file():
        raise ValueError(f"{source}: no ONNX graph to convert (04_reshape.py --onnx writes it)")
    if calibration is not None and not calibration[0]:
        raise ValueError(f"{directory}: no calibration pairs for the int8 IR")
    out = openvino_dir(directory)
    with temporary_dir(out) as tmp:  # nothing half-written: the temporary directory goes on any failure
        batch, reference, feed = sample_reference(loaded, max_length)
        model = openvino.convert_model(str(source))
        for port in model.inputs:  # only the ONNX input names (a graph pass may add e.g. /Cast_output_0)
            names = port.get_names()
            plain = {n for n in names if not n.startswith("/")}
            if plain and plain != names:
                port.get_tensor().set_names(plain)
        # sentence-transformers' CrossEncoder reads a one-label classifier's "logits"
        logits = (kind_of(loaded.kind).pairs and getattr(loaded.model.config, "num_labels", 1) == 1
                  and len(model.outputs) == 1)
        if logits:
            add_logits_output(model)
        xml = tmp / OPENVINO_FILES["openvino"]
        openvino.save_model(model, str(xml), compress_to_fp16=False)
        precision = openvino_precision()
        diffs = {"f32": float(np.abs(OpenVinoRunner(xml, precision="f32")(feed) - reference).max())}
        if precision != "f32":
            diffs[precision] = float(np.abs(OpenVinoRunner(xml)(feed) - reference).max())
        bounds = {"f32": MAX_ABS_DIFF_FP32, "bf16": MAX_ABS_DIFF_BF16, "f16": MAX_ABS_DIFF_BF16}
        for name, diff in diffs.items():
            if not diff <= bounds.get(name, MAX_ABS_DIFF_BF16):
                raise ValueError(f"{directory}: the OpenVINO IR at {name} differs from PyTorch by {diff:.2e} "
                                 f"(> {bounds.get(name, MAX_ABS_DIFF_BF16):g}) on the sample inputs: not written")
        info = {"source": f"{ONNX_FILES['onnx']} (onnx/)", "inputs": list(batch),
                "output": kind_of(loaded.kind).output,
                "logits": ("[batch, 1] the same score, as sentence-transformers' CrossEncoder(dir, "
                           "backend=\"openvino\") reads it") if logits else None,
                "openvino_version": openvino.__version__, "nncf": nncf.__version__, "torch": torch.__version__,
                "exported_on_default_precision": precision,
                "openvino": {"file": xml.name, "recipe": "fp32 weights (converted from the ONNX graph), "
                                                         "run at the CPU's default inference precision",
                             "max_abs_diff_vs_torch": diffs}}
        if calibration is not None:
            queries, passages = calibration
            graph_inputs = {name for port in model.inputs for name in port.get_names()}
            # a graph can take fewer inputs than the model (a layer cut to 0 heads reads no attention mask)
            items = [{k: v for k, v in item.items() if k in graph_inputs}
                     for item in calibration_items(loaded, queries, passages, max_length)]
            quantized = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(items))
            int8_xml = tmp / OPENVINO_FILES["openvino-int8"]
            openvino.save_model(quantized, str(int8_xml), compress_to_fp16=False)
            runner = OpenVinoRunner(int8_xml)
            info["openvino-int8"] = {
                "file": int8_xml.name,
                "recipe": f"NNCF static int8 (transformer preset), calibrated on {len(queries)} training-side pairs",
                "calibration_file": calibration_file, "calibration_pairs": len(queries),
                "calibration_sequences": len(items),
                "max_abs_diff_vs_torch": float(np.abs(runner(feed) - reference).max()),
                "held_out": agreement(loaded, runner, held_out, max_length) if held_out else None}
        (tmp / "export.json").write_text(json.dumps(info, indent=1))
    replace_dir(tmp, out)
    return info
