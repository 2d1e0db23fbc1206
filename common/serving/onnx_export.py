"""ONNX export of a model directory: ``<dir>/onnx/model.onnx`` and ``model_int8.onnx``.

The traced graph is :class:`common.serving.runners.RankingOutput` (scores for a cross-encoder, normalised
embeddings for a bi-encoder) with dynamic batch and sequence axes, so onnxruntime computes what
the torch backend computes; a bi model with BGE-M3 heads also outputs ``sparse_weights`` and
``colbert_vecs`` after it (:func:`graph_module`, ``common.models.m3.HeadOutputs``). Every output
is checked against PyTorch on sample inputs before the export is kept (``MAX_ABS_DIFF``). The int8 file is onnxruntime's dynamic quantization: int8 weights with
one scale per output channel, activations quantized per batch at run time, only the MatMul
weights (embeddings, layer norms and softmax stay fp32); ``keep_fp32`` leaves named projections
(e.g. every layer's FFN output, ``ffn_out``) in fp32. Stock attention is traced in its eager form
(``EXPORT_ATTENTION``): the same function, without the NaN guard PyTorch's SDPA exports over every
attention score. ``export.json`` records the recipe, versions and measured differences.
Everything is written to a temporary directory and renamed; on any failure nothing is left.

With calibration pairs (training-side text, never evaluation topics), the int8 graph is made from
a *smoothed* copy of the model first (SmoothQuant, Xiao et al. 2022): a BERT activation has a few
channels far larger than the rest, and one int8 scale per activation tensor then spends its range
on them. Every ``nn.Linear`` the calibration pairs reach gets its input divided by a per-channel
factor ``s_j = max|x_j|^a / max|W_:,j|^(1 - a)`` and its weight columns multiplied by it (the
same function in exact arithmetic, checked against the model in fp32), so the activation is
flatter and the weight, quantized per output channel, takes the difference. ``a`` =
``SMOOTH_ALPHA``, chosen by agreement with fp32 rankings on training-side queries.
"""
from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn
from transformers import PreTrainedModel

from common.kinds import kind_of
from common.models import m3
from common.models.arch import adapter_for
from common.models.loading import encode_pairs
from common.kinds.loading import LoadedModel
from common.serving.rank import Ranker
from common.serving.runners import OnnxRunner, RankingOutput, onnx_inputs
from common.io import temporary_dir
from common.layout import ONNX_FILES, onnx_dir, replace_dir

OPSET = 17
MAX_ABS_DIFF = 1e-4  # onnxruntime fp32 vs PyTorch fp32 on the sample inputs
INT8_OPS = ["MatMul"]
# attention as matmul + softmax in the graph: PyTorch's SDPA exports with an IsNaN/Where guard over
# every (batch, head, query, key) score, which took ~30 % of onnxruntime's int8 time on CPU
EXPORT_ATTENTION = "eager"
# projections an int8 graph may keep in fp32 (``keep_fp32``): adapter roles (``common.models.arch``)
FP32_ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
SMOOTH_ALPHA = 0.8  # migration strength of the smoothing (0: none onto the weights, 1: all)
HEAD_OUTPUT_DOCS = {  # export.json's "outputs" for a bi model with BGE-M3 heads
    "output": "[batch, dim] the dense embedding (normalised); score = dot product",
    "sparse_weights": "[batch, sequence] each token's lexical weight (ReLU, special tokens and padding 0); "
                      "a text's vector = the max weight per token id (input_ids); score = dot product",
    "colbert_vecs": "[batch, sequence - 1, dim] the ColBERT vectors of the tokens after the first "
                    "(L2-normalised, padding zeroed; mask = attention_mask[:, 1:]); score = MaxSim"}
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
    if not kind_of(loaded.kind).pairs:
        batch = loaded.tokenizer(passages + SAMPLE_QUERIES, truncation=True, max_length=max_length,
                                 padding=True, return_tensors="pt")
    else:
        batch = encode_pairs(loaded.tokenizer, queries, passages, max_length, loaded.model)
    return {k: batch[k] for k in onnx_inputs(loaded)}


def sample_reference(loaded: LoadedModel, max_length: int) -> tuple[dict, np.ndarray, dict]:
    """(:func:`sample_batch`, PyTorch fp32's output on it, the batch as numpy): what every export
    is checked against."""
    batch = sample_batch(loaded, max_length)
    return batch, graph_references(loaded.model, batch)["output"], {k: v.numpy() for k, v in batch.items()}


def graph_module(model: nn.Module) -> nn.Module:
    """What the export traces: :class:`RankingOutput` (one output, ``output``), or for a bi model
    with BGE-M3 heads :class:`common.models.m3.HeadOutputs` (``output``, then ``sparse_weights``
    and/or ``colbert_vecs``: ``m3.graph_outputs``)."""
    return (m3.HeadOutputs(model) if m3.heads_of(model) is not None else RankingOutput(model)).eval()


def graph_references(model: nn.Module, batch: dict) -> dict[str, np.ndarray]:
    """PyTorch fp32's value of each graph output (``m3.graph_outputs``) on ``batch``."""
    with torch.no_grad():
        values = graph_module(model)(**batch)
    values = values if isinstance(values, tuple) else (values,)
    return {name: value.numpy() for name, value in zip(m3.graph_outputs(model), values)}


class SmoothedLinear(nn.Module):
    """``linear(x / s)`` with the weight's input columns multiplied by ``s``: the same function."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor):
        super().__init__()
        self.linear = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight * scale[None, :])
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)
        self.register_buffer("inverse", (1.0 / scale).to(linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inverse)


def activation_maxima(loaded: LoadedModel, queries: list[str], passages: list[str],
                      max_length: int) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of every ``nn.Linear`` the pairs reach (torch fp32, no grad)."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().float().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in loaded.model.named_modules()
               if isinstance(m, nn.Linear) and m.in_features > 0]  # (an emptied layer has none)
    try:
        Ranker.from_loaded(loaded, "torch", max_length=max_length).score(queries, passages)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smoothed_copy(model: nn.Module, maxima: dict[str, torch.Tensor], alpha: float) -> nn.Module:
    """A deep copy of ``model`` whose calibrated linears are :class:`SmoothedLinear`."""
    smoothed = copy.deepcopy(model)
    for name, act in maxima.items():
        parent_name, _, child = name.rpartition(".")
        parent = smoothed.get_submodule(parent_name) if parent_name else smoothed
        linear = getattr(parent, child)
        weight = linear.weight.detach().abs().amax(0).float()
        scale = act.clamp(min=1e-5) ** alpha / weight.clamp(min=1e-5) ** (1 - alpha)
        setattr(parent, child, SmoothedLinear(linear, scale.clamp(min=1e-5)))
    return smoothed.eval()


class EmptyLinear(nn.Module):
    """A linear layer with no inputs or no outputs (an emptied attention block or FFN), traced
    without a zero-size MatMul (OpenVINO's ONNX reader takes a 0 x n weight for a scalar): no
    inputs gives the bias at every position, no outputs an empty slice."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        # what callers read off a linear (an emptied attention block reads its output's width and bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear.out_features == 0:
            return x[..., :0]
        bias = self.linear.bias if self.linear.bias is not None else x.new_zeros(self.linear.out_features)
        return bias.to(x.dtype).expand(*x.shape[:-1], bias.shape[0])


def _empty_linears(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear) and 0 in (child.in_features, child.out_features)]


def _export(module: nn.Module, batch: dict, path: Path) -> None:
    """Trace ``module`` with stock SDPA attention switched to its eager form
    (``EXPORT_ATTENTION``) and emptied linears as :class:`EmptyLinear`, then switch both back.
    The segment head's own attention is left as it is: its SDPA call takes an additive float
    mask, which exports without the NaN guard."""
    names, outputs = list(batch), m3.graph_outputs(module)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes.update({name: m3.GRAPH_AXES[name] for name in outputs})
    switched = [m for m in module.modules() if isinstance(m, PreTrainedModel)
                and m.config._attn_implementation == "sdpa"]
    empty = _empty_linears(module)
    try:
        for parent, name, linear in empty:
            setattr(parent, name, EmptyLinear(linear))
        for encoder in switched:
            encoder.set_attn_implementation(EXPORT_ATTENTION)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            # the TorchScript-based exporter: its graphs ran faster here than the dynamo exporter's
            torch.onnx.export(graph_module(module), tuple(batch[n] for n in names), str(path),
                              input_names=names, output_names=outputs, dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True)
    finally:
        for encoder in switched:
            encoder.set_attn_implementation("sdpa")
        for parent, name, linear in empty:
            setattr(parent, name, linear)


def fp32_nodes(loaded: LoadedModel, graph_path: Path, roles: tuple[str, ...]) -> list[str]:
    """The MatMul nodes of the exported graph that compute the projections ``roles`` of every
    layer (the TorchScript exporter names a node after its module's path: ``/model/<path>/MatMul``,
    ``model`` being ``RankingOutput``'s attribute). Each one must exist in the graph."""
    import onnx

    if not roles:
        return []
    adapter = adapter_for(loaded.model.config)
    pattern = re.compile(rf"(^|\.){re.escape(adapter.layers)}\.\d+\."
                         rf"({'|'.join(re.escape(getattr(adapter, r)) for r in roles)})$")
    linears = [(name, module) for name, module in loaded.model.named_modules()
               if isinstance(module, nn.Linear) and pattern.search(name)]
    if not linears:
        raise ValueError(f"{graph_path}: the model has no {list(roles)} projection (common.models.arch)")
    # an emptied projection (every neuron or head pruned) has no MatMul: nothing to keep in fp32
    names = [name for name, module in linears if module.in_features and module.out_features]
    scopes = ["/model/" + re.sub(r"\.(?!\d)", "/", name) for name in names]  # layer.0 stays one scope
    present = {node.name for node in onnx.load(str(graph_path), load_external_data=False).graph.node}
    # a smoothed graph (SmoothedLinear) names the projection's MatMul one scope deeper: .../linear/MatMul
    nodes = [next((n for n in (f"{s}/MatMul", f"{s}/linear/MatMul") if n in present), f"{s}/MatMul")
             for s in scopes]
    missing = [n for n in nodes if n not in present]
    if missing:
        raise ValueError(f"{graph_path}: no MatMul node for {missing or list(roles)}: the exporter's "
                         "node names changed (common.serving.onnx_export.fp32_nodes)")
    return nodes


def empty_matmuls(graph_path: Path) -> list[str]:
    """MatMul nodes whose weight has no output channel (a decoder layer pruned to 0 FFN neurons:
    its gate and up projections): onnxruntime's per-channel quantizer fails on them."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    empty = {t.name for t in graph.initializer if len(t.dims) == 2 and t.dims[-1] == 0}
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(i in empty for i in n.input)]


def export_onnx(loaded: LoadedModel, directory: str | Path, max_length: int = 256,
                calibration: tuple[list[str], list[str]] | None = None,
                keep_fp32: tuple[str, ...] = (), calibration_source: str | None = None) -> dict:
    """Write ``directory/onnx/`` (fp32 and int8 graphs + export.json); returns export.json.
    ``calibration``: (queries, passages) of training-side pairs: the int8 graph is quantized
    from the smoothed model (module docstring); without it, from the model as it is.
    ``keep_fp32``: projections (``FP32_ROLES``) left in fp32 in every layer of the int8 graph.
    ``calibration_source``: where the calibration pairs came from (recorded in export.json).
    A bi model with BGE-M3 heads gets their outputs beside ``output`` (:func:`graph_module`),
    each checked against PyTorch as ``output`` is and listed under ``outputs`` in export.json."""
    if not loaded.state.is_reshaped:
        raise ValueError(f"{loaded.path}: a masked checkpoint: reshape it first (04_reshape.py)")
    unknown = sorted(set(keep_fp32) - set(FP32_ROLES))
    if unknown:
        raise ValueError(f"keep_fp32: unknown projection(s) {unknown}; choose from {list(FP32_ROLES)}")
    directory = Path(directory)
    out = onnx_dir(directory)
    with temporary_dir(out) as tmp:  # nothing half-written: the temporary directory goes on any failure
        batch = sample_batch(loaded, max_length)
        references, feed = graph_references(loaded.model, batch), {k: v.numpy() for k, v in batch.items()}

        def differences(path: Path) -> dict[str, float]:
            """Each output's max |difference| from PyTorch fp32 on the sample inputs."""
            got = OnnxRunner(path).named(feed)
            if list(got) != list(references):
                raise ValueError(f"{path}: outputs {list(got)}, expected {list(references)}")
            return {name: float(np.abs(got[name] - ref).max()) for name, ref in references.items()}

        def exported(module: nn.Module, path: Path, what: str) -> dict[str, float]:
            """Export ``module`` to ``path``; each output's max |difference| from PyTorch,
            refused over the bound."""
            _export(module, batch, path)
            diffs = differences(path)
            for name, diff in diffs.items():
                if not diff <= MAX_ABS_DIFF:
                    raise ValueError(f"{directory}: the {what}'s {name} differs from PyTorch by {diff:.2e} "
                                     f"(> {MAX_ABS_DIFF:g}) on the sample inputs: not written")
            return diffs

        fp32_diffs = exported(loaded.model, tmp / ONNX_FILES["onnx"], "ONNX graph")
        source, recipe = tmp / ONNX_FILES["onnx"], "dynamic int8, per-channel weights, " + "+".join(INT8_OPS) + " only"
        smoothing = None
        if calibration is not None:
            queries, passages = calibration
            maxima = activation_maxima(loaded, queries, passages, max_length)
            source = tmp / "smoothed.onnx"
            smoothing = {"alpha": SMOOTH_ALPHA, "calibration_pairs": len(queries), "linears": len(maxima),
                         "calibration_source": str(Path(calibration_source).resolve()) if calibration_source else None,
                         "max_abs_diff_vs_torch_fp32": exported(smoothed_copy(loaded.model, maxima, SMOOTH_ALPHA),
                                                                source, "smoothed graph")["output"]}
            recipe += f", smoothed (SmoothQuant, alpha {SMOOTH_ALPHA}) on {len(queries)} calibration pairs"
        excluded = fp32_nodes(loaded, source, tuple(keep_fp32))
        if excluded:
            recipe += f", {'+'.join(keep_fp32)} kept in fp32 ({len(excluded)} MatMuls)"
        quantize_dynamic(str(source), str(tmp / ONNX_FILES["onnx-int8"]), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=INT8_OPS,
                         nodes_to_exclude=excluded + empty_matmuls(source))
        if smoothing:
            source.unlink()  # only its int8 graph is kept
        int8_diffs = differences(tmp / ONNX_FILES["onnx-int8"])
        info = {"inputs": list(batch), "output": kind_of(loaded.kind).output,
                "opset": OPSET, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                "onnx": {"file": ONNX_FILES["onnx"], "recipe": f"fp32 (TorchScript exporter, {EXPORT_ATTENTION} attention)",
                         "max_abs_diff_vs_torch": fp32_diffs["output"]},
                "onnx-int8": {"file": ONNX_FILES["onnx-int8"],
                              "recipe": recipe, "smoothing": smoothing, "fp32_nodes": excluded,
                              "max_abs_diff_vs_torch": int8_diffs["output"]}}
        if len(references) > 1:  # BGE-M3 heads: every output, and each one's difference
            info["outputs"] = {name: HEAD_OUTPUT_DOCS[name] for name in references}
            info["onnx"]["max_abs_diff_vs_torch_by_output"] = fp32_diffs
            info["onnx-int8"]["max_abs_diff_vs_torch_by_output"] = int8_diffs
        (tmp / "export.json").write_text(json.dumps(info, indent=1))
    replace_dir(tmp, out)
    return info
