"""The ranking API: one entry point for scoring with any model kind on any backend.

    from common.serving.rank import Ranker
    ranker = Ranker.load("runs/main/final", backend="onnx-int8")
    ranker.rank("what is a cat", ["a cat is an animal", "the stock market fell"])
    # -> [(0, 8.97), (1, 0.12)]: (index into the passages, score), best first

Backends (``BACKENDS``): ``torch`` (fp32), ``torch-bf16`` / ``torch-fp16`` (autocast), ``onnx``
(onnxruntime, fp32) and ``onnx-int8`` (onnxruntime, dynamically quantized weights); the two ONNX
files are written by ``04_reshape.py --onnx`` into ``<model dir>/onnx/`` (``common.serving.onnx_export``).
``openvino`` (the OpenVINO runtime at the CPU's default inference precision: bf16 where the CPU
has native bf16, AVX512-BF16 or AMX, fp32 elsewhere; :func:`openvino_precision`) and
``openvino-int8`` (NNCF static post-training quantization) run the IR that ``04_reshape.py
--openvino`` writes into ``<model dir>/openvino/`` (``common.serving.openvino_export``). ``auto``
takes the backend measured fastest on this host class (``common.serving.choose``).

Model kinds are classes (``common.kinds``): the kind scores (a cross-encoder's (query, passage)
pair in one sequence; a bi-encoder's queries and passages embedded alone, cosine, each distinct
text once, its queries by the frozen query encoder its config names, ``slimrank_query_encoder``:
an asymmetric bi-encoder); the ranker holds the model, its tokenizer, one runner, the maximum
length and batch size. Both batch length-sorted (``common.models.loading.sorted_batches``)
without gradients; ``score`` keeps the input order, ``rank`` sorts one query's passages.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from common import layout
from common.serving.runners import (BACKENDS, TORCH_PRECISION, make_runner, openvino_precision)
from common.hardware import machine_description
from common.kinds import BiKind, kind_of
from common.models.loading import QUERY_ENCODER_FIELD, config_path, pick_device, pooling_of
from common.kinds.loading import LoadedModel, load_model

AUTO = "auto"  # a shipped dir's measured fastest backend on this host, else torch fp32 (resolve_backend)


def query_encoder_of(loaded: LoadedModel) -> str | None:
    """The encoder a bi model's queries go through (None: the model itself), as its config says:
    a directory inside the model dir, a packaged tag or a hub name; anything that leads outside
    the dir is refused (``common.models.encoders.config_path``)."""
    name = getattr(loaded.model.config, QUERY_ENCODER_FIELD, None)
    if not name:
        return None
    return config_path(loaded.path, name, QUERY_ENCODER_FIELD)


def check_query_encoder(model: LoadedModel, encoder: LoadedModel, name: str) -> None:
    """Refuse a query encoder whose query embeddings cannot meet ``model``'s passage embeddings:
    training embeds the queries with the student's tokenizer and pooling and scoring with the
    encoder's own, so both must agree, and so must the embedding width; an encoder that names a
    query encoder itself (a chain) is refused too."""
    where = f"query encoder {name!r} (--query_encoder, or {QUERY_ENCODER_FIELD} in {model.path}/config.json)"
    chain = getattr(encoder.model.config, QUERY_ENCODER_FIELD, None)  # named, never followed
    if chain:
        raise ValueError(f"{where}: names a query encoder of its own ({chain!r}); "
                         "name the model that embeds the queries directly")
    width = [getattr(m.model.config, "hidden_size", None) for m in (model, encoder)]
    if width[0] != width[1]:
        raise ValueError(f"{where}: embeds in {width[1]} dimensions, the model in {width[0]}")
    pooling = [pooling_of(m.model) for m in (model, encoder)]
    if pooling[0] != pooling[1]:
        raise ValueError(f"{where}: pools by {pooling[1]!r}, the model by {pooling[0]!r}")
    if model.tokenizer.get_vocab() != encoder.tokenizer.get_vocab():
        raise ValueError(f"{where}: another tokenizer vocabulary than the model's")


def backend_for_precision(precision: str) -> str:
    """The torch backend of a training precision (fp32, bf16, fp16)."""
    return {p: b for b, p in TORCH_PRECISION.items()}[precision]


@lru_cache(maxsize=4)
def _query_encoder(name: str, device: str) -> LoadedModel:
    """A frozen query encoder, loaded once per process and device (every evaluation of a run, and
    every in-training evaluation, embeds its queries with the same weights)."""
    encoder = load_model(name, device, kind=BiKind.name)
    encoder.model.eval().requires_grad_(False)
    return encoder


class Ranker:
    """Tokenise, batch and score with one runner, as the model's kind (``kind``: its class in
    ``common.kinds``) says."""

    query_ranker: "Ranker | None" = None  # embeds the queries when the model names a query encoder
    query_encoder: str | None = None

    def __init__(self, loaded: LoadedModel, runner, backend: str, max_length: int = 256,
                 batch_size: int = 64):
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        self.kind = kind_of(loaded.kind)
        specials = loaded.tokenizer.num_special_tokens_to_add(pair=self.kind.pairs)
        if max_length <= specials + self.kind.pairs:
            raise ValueError(f"max_length {max_length} leaves no room for text: this model's "
                             f"tokenizer adds {specials} special tokens per sequence")
        self.loaded, self.tokenizer, self.runner = loaded, loaded.tokenizer, runner
        self.backend, self.max_length, self.batch_size = backend, max_length, batch_size

    @classmethod
    def load(cls, path: str, backend: str = "torch", *, max_length: int = 256, batch_size: int = 64,
             device: str = "cpu", kind: str | None = None, threads: int | None = None) -> "Ranker":
        return cls.from_loaded(load_model(path, pick_device(device), kind=kind), backend,
                               max_length=max_length, batch_size=batch_size, threads=threads)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, backend: str = "torch", *, max_length: int = 256,
                    batch_size: int = 64, threads: int | None = None,
                    query_encoder: str | None = None) -> "Ranker":
        """``query_encoder`` (bi only): embed the queries with this encoder instead of the one
        the model's config names (or the model itself)."""
        backend = resolve_backend(loaded.path, backend)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "torch-fp16" and next(loaded.model.parameters()).device.type != "cuda":
            raise ValueError(f"backend torch-fp16 needs a CUDA device (the model is on "
                             f"{next(loaded.model.parameters()).device.type}): use torch, torch-bf16 or an exported backend")
        runner = make_runner(loaded, backend, threads)
        ranker = cls(loaded, runner, backend, max_length, batch_size)
        if query_encoder and ranker.kind.pairs:
            raise ValueError(f"a query encoder is for bi-encoders; {loaded.path} is a {loaded.kind} model")
        query_encoder = query_encoder or (query_encoder_of(loaded) if not ranker.kind.pairs else None)
        if query_encoder:
            # same torch precision as the passages; an ONNX passage side keeps the query
            # encoder's own default (torch fp32 unless it is a shipped dir itself)
            device = next(loaded.model.parameters()).device
            local = Path(query_encoder).expanduser()
            encoder = _query_encoder(str(local.resolve()) if local.is_dir() else query_encoder, str(device))
            check_query_encoder(loaded, encoder, query_encoder)
            ranker.query_ranker = Ranker.from_loaded(
                encoder,
                backend if backend in TORCH_PRECISION else AUTO, max_length=max_length,
                batch_size=batch_size, threads=threads, query_encoder=None)
            ranker.query_encoder = query_encoder
        return ranker

    def with_batch_size(self, batch_size: int) -> "Ranker":
        """The same ranker (same runner, same query encoder) scoring ``batch_size`` at a time."""
        ranker = copy.copy(self)
        ranker.batch_size = batch_size
        if self.query_ranker is not None:
            ranker.query_ranker = self.query_ranker.with_batch_size(batch_size)
        return ranker

    def score(self, queries: list[str], passages: list[str], progress: bool = False) -> np.ndarray:
        """One score per (query, passage) pair, in the input order."""
        self._check(queries, passages)
        if not len(queries):
            return np.empty(0, dtype=np.float32)
        return self.kind.score(self, queries, passages, progress)

    def encode(self, texts: list[str], progress: bool = False, role: str | None = None) -> np.ndarray:
        """Embeddings ``[len(texts), dim]`` (float32) of ``texts`` as ``role`` (``query``,
        ``passage``, None: no role), for a kind that embeds texts alone."""
        return self.kind.encode(self, texts, progress, role)

    def head_scores(self, queries, passages, progress: bool = False) -> dict[str, np.ndarray]:
        """Every scoring head's score of each pair (``dense``, and a kind's own heads)."""
        self._check(queries, passages)
        return self.kind.head_scores(self, queries, passages, progress)

    def run(self, batch: dict) -> np.ndarray:
        """The runner on one ready batch (e.g. worst-case cost inputs)."""
        return self.runner(batch)

    def sequences_per_query(self, n_pairs: int) -> int:
        """Encoder sequences one query with ``n_pairs`` candidates costs (MACs of a query)."""
        return self.kind.sequences_per_query(n_pairs)

    def extra_costs(self, candidates, opts, device: torch.device) -> dict:
        """Kind-specific cost columns of a results row (``opts``: ``common.evaluation.rerank.CostOptions``)."""
        return self.kind.extra_costs(self, candidates, opts, device)

    def rank(self, query: str, passages: list[str], top_k: int | None = None) -> list[tuple[int, float]]:
        """``(passage index, score)`` pairs, best first (ties keep the input order); the best
        ``top_k`` (>= 1) only when given; no passages, no pairs."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        if isinstance(passages, (str, bytes)) or not hasattr(passages, "__len__"):
            raise TypeError(f"passages must be a list of strings, got {type(passages).__name__}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a whole number >= 1 (or None for all), got {top_k!r}")
        if not len(passages):
            return []
        scores = self.score([query] * len(passages), list(passages))
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [(int(i), float(scores[i])) for i in order]

    def _check(self, queries, passages) -> None:
        if isinstance(queries, (str, bytes)) or isinstance(passages, (str, bytes)):
            raise TypeError("queries and passages must be lists of strings, not a single string")
        bad = next((x for x in (*queries, *passages) if not isinstance(x, str)), None)
        if bad is not None:
            raise TypeError(f"queries and passages must be strings, got a {type(bad).__name__}: {bad!r}")
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages")


def resolve_backend(path: str | Path, backend: str) -> str:
    """``auto``: for a shipped dir (one with an ONNX or OpenVINO export, 04_reshape.py --onnx /
    --openvino) the backend a short micro-benchmark found fastest on this host class, cached in
    the dir (``common.serving.choose``); for any other dir (the packaged teacher, checkpoints)
    torch fp32, so teacher scores are the same on every host."""
    if backend != AUTO:
        return backend
    from common.serving.choose import exported_backends, fastest_backend

    if not exported_backends(path):
        return "torch"
    return fastest_backend(path)


def describe_backend(path: str | Path, backend: str) -> dict:
    """What the results table says about a backend: the quantization recipe of an exported file,
    and for OpenVINO the precision it computes in on this host."""
    info = {"backend": backend, "backend_host": machine_description()}
    if backend.startswith("openvino"):
        precision = openvino_precision()
        info["backend_precision"] = f"int8, other ops {precision}" if backend.endswith("int8") else precision
    folder = layout.onnx_dir(path) if backend.startswith("onnx") else layout.openvino_dir(path)
    meta = folder / "export.json"
    if backend not in TORCH_PRECISION and meta.is_file():
        info["export"] = json.loads(meta.read_text()).get(backend, {}).get("recipe", "")
    return info
