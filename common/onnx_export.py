"""ONNX export of a model directory: ``<dir>/onnx/model.onnx`` and ``model_int8.onnx``.

The traced graph is :class:`common.rank.RankingOutput` (scores for a cross-encoder, normalised
embeddings for a bi-encoder) with dynamic batch and sequence axes, so onnxruntime computes what
the torch backend computes; the export is checked against PyTorch on sample inputs before it is
kept (``MAX_ABS_DIFF``). The int8 file is onnxruntime's dynamic quantization: int8 weights with
one scale per output channel, activations quantized per batch at run time, only the MatMul
weights (embeddings, layer norms and softmax stay fp32). ``export.json`` records the recipe,
versions and measured differences. Everything is written to a temporary directory and renamed.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

from common.modeling import LoadedModel, encode_pairs
from common.rank import ONNX_FILES, OnnxRunner, RankingOutput, onnx_inputs
from common.rundir import onnx_dir, replace_dir

OPSET = 17
MAX_ABS_DIFF = 1e-4  # onnxruntime fp32 vs PyTorch fp32 on the sample inputs
INT8_OPS = ["MatMul"]
SAMPLE_QUERIES = ["what is the boiling point of water at altitude",
                  "who wrote the declaration of independence", "symptoms of iron deficiency"]
SAMPLE_PASSAGES = ["Water boils at lower temperatures as altitude increases, because the air "
                   "pressure is lower: about 95 degrees Celsius at 1,500 metres.",
                   "Thomas Jefferson drafted the Declaration of Independence in 1776.",
                   "Fatigue, pale skin and shortness of breath are common signs."]


def sample_batch(loaded: LoadedModel, max_length: int) -> dict[str, torch.Tensor]:
    """A small padded batch in the model's own input layout (pairs, or single texts)."""
    queries = [q for q in SAMPLE_QUERIES for _ in SAMPLE_PASSAGES]
    passages = SAMPLE_PASSAGES * len(SAMPLE_QUERIES)
    if loaded.kind == "bi":
        batch = loaded.tokenizer(passages + SAMPLE_QUERIES, truncation=True, max_length=max_length,
                                 padding=True, return_tensors="pt")
    else:
        batch = encode_pairs(loaded.tokenizer, queries, passages, max_length, loaded.model)
    return {k: batch[k] for k in onnx_inputs(loaded)}


def export_onnx(loaded: LoadedModel, directory: str | Path, max_length: int = 256) -> dict:
    """Write ``directory/onnx/`` (fp32 and int8 graphs + export.json); returns export.json."""
    if not loaded.state.is_reshaped:
        raise ValueError(f"{loaded.path}: a masked checkpoint: reshape it first (04_reshape.py)")
    directory = Path(directory)
    out = onnx_dir(directory)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    wrapper = RankingOutput(loaded.model).eval()
    batch = sample_batch(loaded, max_length)
    names = list(batch)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["output"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        # the TorchScript-based exporter: its graphs ran faster here than the dynamo exporter's
        torch.onnx.export(wrapper, tuple(batch[n] for n in names), str(tmp / ONNX_FILES["onnx"]),
                          input_names=names, output_names=["output"], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
        reference = wrapper(**batch).numpy()
    quantize_dynamic(str(tmp / ONNX_FILES["onnx"]), str(tmp / ONNX_FILES["onnx-int8"]),
                     weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=INT8_OPS)
    feed = {k: v.numpy() for k, v in batch.items()}
    diffs = {b: float(np.abs(OnnxRunner(tmp / f)(feed) - reference).max()) for b, f in ONNX_FILES.items()}
    if not diffs["onnx"] <= MAX_ABS_DIFF:
        shutil.rmtree(tmp)
        raise ValueError(f"{directory}: the ONNX graph differs from PyTorch by {diffs['onnx']:.2e} "
                         f"(> {MAX_ABS_DIFF:g}) on the sample inputs: not written")
    info = {"inputs": names, "output": "scores" if loaded.kind == "cross" else "normalised embeddings",
            "opset": OPSET, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": {"file": ONNX_FILES["onnx"], "recipe": "fp32 (TorchScript exporter)",
                     "max_abs_diff_vs_torch": diffs["onnx"]},
            "onnx-int8": {"file": ONNX_FILES["onnx-int8"],
                          "recipe": "dynamic int8, per-channel weights, " + "+".join(INT8_OPS) + " only",
                          "max_abs_diff_vs_torch": diffs["onnx-int8"]}}
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    replace_dir(tmp, out)
    return info
