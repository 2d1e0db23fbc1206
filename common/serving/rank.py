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

Model kinds are classes: :class:`CrossRanker` scores a (query, passage) pair in one sequence
(the model's own pair layout: the monoBERT template or the segment head's); :class:`BiRanker`
embeds queries and passages alone and scores by cosine, each distinct text once; a bi model
whose config names a query encoder (``slimrank_query_encoder``: trained with
``--query_encoder``, see ``common.training.kinds``) embeds its queries with that frozen encoder and only
its passages itself (an asymmetric bi-encoder: a pruned passage encoder beside the unpruned query
encoder whose embedding space it was trained to). Both batch
length-sorted (``common.models.loading.sorted_batches``) without gradients; ``score`` keeps the
input order, ``rank`` sorts one query's passages.
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
from common.hardware import machine_description, time_callable
from common.models.encoders import max_length_of, similarity, with_prompt
from common.models.loading import (QUERY_ENCODER_FIELD, LoadedModel, config_path, encode_pairs, load_model,
                             pick_device, pooling_of, sorted_batches)

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
    encoder = load_model(name, device, kind="bi")
    encoder.model.eval().requires_grad_(False)
    return encoder


class Ranker:
    """Tokenise, batch and score with one runner; :meth:`load` picks the kind's class."""

    kind = ""
    default_head = None  # the head a results row names when the config names none

    def __init__(self, loaded: LoadedModel, runner, backend: str, max_length: int = 256,
                 batch_size: int = 64):
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        specials = loaded.tokenizer.num_special_tokens_to_add(pair=loaded.kind == "cross")
        if max_length <= specials + (loaded.kind == "cross"):
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
        ranker = {"cross": CrossRanker, "bi": BiRanker}[loaded.kind](loaded, runner, backend, max_length,
                                                                      batch_size)
        if query_encoder and loaded.kind != "bi":
            raise ValueError(f"a query encoder is for bi-encoders; {loaded.path} is a {loaded.kind} model")
        query_encoder = query_encoder or (query_encoder_of(loaded) if loaded.kind == "bi" else None)
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
        if getattr(self, "query_ranker", None) is not None:
            ranker.query_ranker = self.query_ranker.with_batch_size(batch_size)
        return ranker

    def score(self, queries: list[str], passages: list[str], progress: bool = False) -> np.ndarray:
        """One score per (query, passage) pair, in the input order."""
        raise NotImplementedError

    def run(self, batch: dict) -> np.ndarray:
        """The runner on one ready batch (e.g. worst-case cost inputs)."""
        return self.runner(batch)

    def sequences_per_query(self, n_pairs: int) -> int:
        """Encoder sequences one query with ``n_pairs`` candidates costs (MACs of a query)."""
        raise NotImplementedError

    def extra_costs(self, candidates, opts, device: torch.device) -> dict:
        """Kind-specific cost columns of a results row (``opts``: ``common.evaluation.rerank.CostOptions``)."""
        return {}

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


class CrossRanker(Ranker):
    kind = "cross"
    default_head = "classifier"

    def sequences_per_query(self, n_pairs: int) -> int:
        return n_pairs  # one (query, passage) sequence per candidate

    def score(self, queries, passages, progress: bool = False) -> np.ndarray:
        self._check(queries, passages)
        if not len(queries):
            return np.empty(0, dtype=np.float32)
        features = encode_pairs(self.tokenizer, list(queries), list(passages), self.max_length,
                                self.loaded.model, padding=False)
        scores = np.empty(len(queries), dtype=np.float32)
        for idx, batch in sorted_batches(self.tokenizer, features, self.batch_size, progress):
            scores[idx] = self.runner(dict(batch))
        return scores


class BiRanker(Ranker):
    kind = "bi"
    query_ranker: "BiRanker | None" = None  # embeds the queries when the model names a query encoder
    query_encoder: str | None = None

    def sequences_per_query(self, n_pairs: int) -> int:
        return n_pairs + 1  # the passages and the query, each encoded alone

    def extra_costs(self, candidates, opts, device, passages: int = 1000) -> dict:
        """Corpus-encoding throughput (what indexing costs): passages/s over the first
        ``passages`` distinct candidate passages, batches of 64, mean ± std over repeats."""
        texts = list(dict.fromkeys(candidates["passage"]))[:passages]
        encoder = Ranker.from_loaded(self.loaded, self.backend, max_length=self.max_length, batch_size=64)
        mean_ms, std_ms = time_callable(lambda: encoder.encode(texts), max(1, opts.repeats - 1),
                                             min(opts.warmup, 1), device)
        return {"encode_passages_per_s": len(texts) / (mean_ms / 1000),
                "encode_passages_per_s_std": len(texts) * std_ms / 1000 / (mean_ms / 1000) ** 2,
                "encode_passages": len(texts)}

    def encode(self, texts: list[str], progress: bool = False, role: str | None = None) -> np.ndarray:
        """Embeddings ``[len(texts), dim]`` (float32) of ``texts`` as ``role`` (``query``,
        ``passage``, None: no role), with the model's prompt for it."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        model = self.loaded.model
        features = self.tokenizer(with_prompt(model, texts, role), truncation=True,
                                  max_length=max_length_of(model, self.max_length))
        features = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = None
        for idx, batch in sorted_batches(self.tokenizer, features, self.batch_size, progress, "encoding"):
            emb = self.runner(dict(batch))
            if out is None:
                out = np.empty((len(texts), emb.shape[-1]), dtype=np.float32)
            out[idx] = emb
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    def head_scores(self, queries, passages, progress: bool = False) -> dict[str, np.ndarray]:
        """Every head's score of each pair, in the input order: ``dense`` and, for a model with
        BGE-M3 heads (``common.models.m3``), ``sparse``, ``colbert`` and their weighted
        ``combined`` sum. The sparse and ColBERT heads run in torch fp32 on the model's device
        (whatever the backend: the ONNX exports hold the dense output only); each query's
        passages go in batches beside it."""
        from common.models import m3

        self._check(queries, passages)
        module = m3.heads_of(self.loaded.model)
        if module is None:
            return {"dense": self.score(queries, passages, progress)}
        if self.query_ranker is not None:
            raise ValueError("sparse and ColBERT scores need the model's own query side (no query encoder)")
        model, pooling = self.loaded.model, self.loaded.model.config.slimrank_pooling
        names = ["dense", *(n for n in ("sparse", "colbert") if n in module.heads), "combined"]
        out = {name: np.empty(len(queries), dtype=np.float32) for name in names}
        rows: dict[str, list[int]] = {}
        for i, query in enumerate(queries):
            rows.setdefault(query, []).append(i)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for query, idx in rows.items():
                    q = m3.encode_all(model, self.tokenizer, [query], pooling, self.max_length)
                    for start in range(0, len(idx), self.batch_size):
                        part = idx[start:start + self.batch_size]
                        p = m3.encode_all(model, self.tokenizer, [passages[i] for i in part], pooling,
                                          self.max_length)
                        for name, value in m3.score_matrices(q, p).items():
                            out[name][part] = value[0].float().cpu().numpy()
        finally:
            model.train(was_training)
        return out

    def score(self, queries, passages, progress: bool = False) -> np.ndarray:
        self._check(queries, passages)
        if not len(queries):
            return np.empty(0, dtype=np.float32)
        uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
        up, pi = np.unique(np.asarray(passages, dtype=object), return_inverse=True)
        q = torch.from_numpy((self.query_ranker or self).encode(list(uq), progress, "query"))
        p = torch.from_numpy(self.encode(list(up), progress, "passage"))
        return similarity(self.loaded.model, q[torch.as_tensor(qi)], p[torch.as_tensor(pi)]).numpy()


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
