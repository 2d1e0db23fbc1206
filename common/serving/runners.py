"""The runners: one backend each, a ready batch in, scores (cross) or embeddings (bi) out.

:class:`RankingOutput` is what every backend computes (the graph the exports trace);
:class:`TorchRunner` runs it in PyTorch (fp32 or under autocast), :class:`OnnxRunner` the ONNX
export in onnxruntime, :class:`OpenVinoRunner` the OpenVINO IR; :func:`make_runner` picks one
by backend name (``BACKENDS``). ``common.serving.rank`` (tokenising, batching, the kinds) and
``common.serving.choose`` (``auto``'s measurement) both build on these.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import layout
from common.layout import ONNX_FILES, OPENVINO_FILES
from common.kinds import kind_of
from common.models.loading import autocast_context, pooling_of
from common.kinds.loading import LoadedModel, kind_of_model

BACKENDS = ("torch", "torch-bf16", "torch-fp16", "onnx", "onnx-int8", "openvino", "openvino-int8")
TORCH_PRECISION = {"torch": "fp32", "torch-bf16": "bf16", "torch-fp16": "fp16"}


class RankingOutput(nn.Module):
    """What a ranker needs from a model, as one module (the graph ONNX export traces): what its
    kind computes per sequence (``runner_output``: a cross-encoder's relevance score of each pair,
    a bi-encoder's embedding of each text)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.kind = kind_of_model(model)
        self.pooling = pooling_of(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.kind.runner_output(self.model, input_ids, attention_mask, extra)


class TorchRunner:
    """Runs :class:`RankingOutput` in PyTorch (fp32, or under bf16/fp16 autocast)."""

    def __init__(self, loaded: LoadedModel, precision: str = "fp32"):
        self.output = RankingOutput(loaded.model)
        self.device = next(loaded.model.parameters()).device
        self.precision = precision

    @torch.no_grad()
    def __call__(self, batch: dict) -> np.ndarray:
        """Scores in eval mode; a model in training mode (evaluation during training) is put
        back in it afterwards."""
        batch = {k: torch.as_tensor(v).to(self.device) for k, v in batch.items()}
        was_training = self.output.model.training
        if was_training:
            self.output.model.eval()
        try:
            with autocast_context(self.device, self.precision):
                return self.output(**batch).float().cpu().numpy()
        finally:
            if was_training:
                self.output.model.train()


class OnnxRunner:
    """Runs an exported ``model.onnx`` / ``model_int8.onnx`` in onnxruntime (CPU)."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime  # imported here: only the ONNX backends need it (a large import)

        if not path.is_file():
            raise ValueError(f"{path}: no ONNX export (run 04_reshape.py --onnx on {path.parent.parent})")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch: dict) -> np.ndarray:
        """The graph's first output (scores, or embeddings)."""
        return self.named(batch, self.outputs[:1])[self.outputs[0]]

    def named(self, batch: dict, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs ``names`` (default: all; a bi model with BGE-M3 heads has
        ``sparse_weights`` / ``colbert_vecs`` beside ``output``, ``common.models.m3``) by name."""
        feed = {k: np.asarray(batch[k], dtype=np.int64) for k in self.inputs}
        names = list(self.outputs if names is None else names)
        return dict(zip(names, self.session.run(names, feed)))


def openvino_precision() -> str:
    """The precision OpenVINO's CPU plugin computes in by default on this host (``bf16`` where the
    CPU has native bf16, else ``f32``): what the ``openvino`` backend runs at."""
    import openvino

    return openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def _input_name(names: set[str]) -> str:
    """The tokenizer-side name among an OpenVINO input's names (input_ids, attention_mask, ...)."""
    plain = sorted(n for n in names if not n.startswith("/"))
    return plain[0] if plain else sorted(names)[0]


class OpenVinoRunner:
    """Runs an OpenVINO IR (``openvino/openvino_model*.xml``) on the CPU plugin, at its default
    inference precision unless ``precision`` (``f32``) says otherwise; latency hint, ``threads``
    (default: torch's) inference threads."""

    def __init__(self, path: Path, threads: int | None = None, precision: str | None = None):
        import openvino  # imported here: only the OpenVINO backends need it

        if not path.is_file():
            raise ValueError(f"{path}: no OpenVINO IR (run 04_reshape.py --openvino on {path.parent.parent})")
        core = openvino.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
        if precision:
            config["INFERENCE_PRECISION_HINT"] = precision
        model = core.read_model(str(path))
        # an input tensor may carry several names (a graph pass can add one, e.g. /Cast_output_0):
        # the model's input names are the ones the ONNX graph was exported with
        self.inputs = [_input_name(i.get_names()) for i in model.inputs]
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def __call__(self, batch: dict) -> np.ndarray:
        feed = {k: np.asarray(batch[k], dtype=np.int64) for k in self.inputs}
        return np.array(self.request.infer(feed)[0], dtype=np.float32)  # a copy: the request reuses its buffer


def make_runner(loaded: LoadedModel, backend: str, threads: int | None = None):
    """The runner of one backend (``BACKENDS``) for a loaded model (its exports for ONNX/OpenVINO)."""
    if backend in TORCH_PRECISION:
        return TorchRunner(loaded, TORCH_PRECISION[backend])
    if backend in ONNX_FILES:
        return OnnxRunner(layout.onnx_dir(loaded.path) / ONNX_FILES[backend], threads)
    return OpenVinoRunner(layout.openvino_dir(loaded.path) / OPENVINO_FILES[backend], threads)


def onnx_inputs(loaded: LoadedModel) -> list[str]:
    """The inputs the exported graph takes: token types only where the model uses them (the
    monoBERT pair template of a family that has them)."""
    names = ["input_ids", "attention_mask"]
    uses_types = (kind_of(loaded.kind).pairs and getattr(loaded.model.config, "slimrank_head", None) is None
                  and "token_type_ids" in loaded.tokenizer.model_input_names
                  and getattr(loaded.model.config, "type_vocab_size", 1) > 1)
    return names + (["token_type_ids"] if uses_types else [])
