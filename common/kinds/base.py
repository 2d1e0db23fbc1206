"""The model-kind interface: everything a kind of model is, in one class.

A kind (``cross``: ``common.kinds.cross``; ``bi``: ``common.kinds.bi``) is registered by name in
``KINDS`` (``@register_kind("name")``; the name is what config.json stores as
``slimrank_model_kind`` and what ``--model_kind`` takes). Its class says:

- **scoring** (``score``, and for a kind that embeds texts alone ``encode``/``head_scores``): how
  a ranker (``common.serving.rank.Ranker``, taken by duck typing: its tokenizer, runner,
  ``max_length``, ``batch_size``, ``loaded``) turns (query, passage) pairs into scores;
  ``output``: what a runner and the exported graphs compute per sequence (``runner_output``);
- **cost** (``sequences_per_query``, ``extra_costs``): the encoder sequences one query costs
  (``pairs``: one per (query, passage) pair, else each text alone) and the kind's own cost columns;
- **training** (an instance, bound to the student's tokenizer and layout): ``forward`` tokenises a
  batch of training rows, runs the student and offers the tensors the losses of
  ``common.training.losses`` take (``Forward.inputs``); ``teacher_forward``/``distill_inputs``:
  the teacher of ``--distill_from`` on the same rows and what that distillation compares;
  ``combine``: how the task and distillation losses add up; ``label_loss``: which task loss
  trains on labels (a registered loss name and its options); ``check_args``: the arguments the
  kind refuses. ``common.training.loop.Trainer`` calls this interface and never branches on the kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.registry import registrar

KINDS: dict[str, type["ModelKind"]] = {}
register_kind = registrar(KINDS, "a model kind")


def kind_of(name: str) -> type["ModelKind"]:
    """The kind class registered as ``name`` (e.g. ``loaded.kind``, config.json's
    ``slimrank_model_kind``)."""
    if name not in KINDS:
        raise ValueError(f"model kind must be one of {tuple(KINDS)}, got {name!r}")
    return KINDS[name]


@dataclass
class Forward:
    """One forward pass over training rows: the loss inputs it offers, the tokenised batch the
    pruning callback sees, and what the distillation needs of it (``extra``)."""

    inputs: dict[str, torch.Tensor]
    batch: dict
    extra: dict


def length_chunks(batch: dict, chunk: int):
    """``(index, sub-batch)`` pairs: the batch's sequences sorted by length (stable), in chunks of at
    most ``chunk``, each cut to its own longest sequence (right padding: tensors shaped (batch,
    width) are cut, those shaped (batch,) indexed, the rest passed as they are). ``chunk`` 0 or at
    least the batch: the whole batch, once, with ``index`` None."""
    mask = batch["attention_mask"]
    n, width = mask.shape
    if chunk <= 0 or n <= chunk:
        yield None, batch
        return
    lengths = mask.sum(dim=1)
    for index in torch.argsort(lengths, stable=True).split(chunk):
        keep = int(lengths[index].max())
        yield index, {k: (v[index][:, :keep] if torch.is_tensor(v) and v.shape[:2] == (n, width)
                          else v[index] if torch.is_tensor(v) and v.shape[:1] == (n,) else v)
                      for k, v in batch.items()}


def chunked_call(module: nn.Module, batch: dict, chunk: int):
    """``module(**batch)`` run over :func:`length_chunks` (the padding a whole batch pads to its
    longest is left out; the function is the same: padding is masked), the outputs put back in
    the batch's order. Per-sequence outputs (first dim the batch) are concatenated; those with a
    token axis (dim 1) are padded back to the batch's width with zeros. ``chunk`` 0 or at least
    the batch: one call. Every forward of a chunk is part of one autograd graph, so one backward
    follows as after a single call."""
    n, width = batch["attention_mask"].shape
    if chunk <= 0 or n <= chunk:
        return module(**batch)
    indices, parts = [], []
    for index, part in length_chunks(batch, chunk):
        indices.append(index)
        parts.append(module(**part))
    order = torch.cat(indices)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    merged = {}
    for key, first in parts[0].items():
        if first is None:
            continue
        if not torch.is_tensor(first):
            raise ValueError(f"chunked forward: output {key} is not a tensor; run the batch at once")
        values = [part[key] for part in parts]
        if first.dim() >= 3:  # a token axis: back to the batch's width
            pad = [0, 0] * (first.dim() - 2)
            values = [torch.nn.functional.pad(v, pad + [0, width - v.shape[1]]) for v in values]
        merged[key] = torch.cat(values)[inverse]
    return parts[0].__class__(**merged)


class ModelKind:
    """One kind of model; the class holds what the kind is, an instance its training side,
    bound to the student's tokenizer and layout."""

    name = ""
    pairs = True  # one sequence per (query, passage) pair; False: each text embedded alone
    output = ""  # what a runner (and an exported graph) computes per sequence
    default_head = None  # the head a results row names when the config names none
    task_key = "task"  # the task loss's key in the logged train events
    distill_beside_scores = True  # with --distill_scores, is --distill_from still trained on?
    caches_teacher = False  # --cache_teacher: the teacher's outputs are a function of each text alone

    # -- scoring and cost (class level; ``ranker``: a common.serving.rank.Ranker)

    @staticmethod
    def runner_output(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      extra: dict) -> torch.Tensor:
        """What every backend computes for a ready batch (``common.serving.runners.RankingOutput``)."""
        raise NotImplementedError

    @classmethod
    def score(cls, ranker, queries: list[str], passages: list[str], progress: bool = False) -> np.ndarray:
        """One score per (query, passage) pair, in the input order (already checked)."""
        raise NotImplementedError

    @classmethod
    def encode(cls, ranker, texts: list[str], progress: bool = False, role: str | None = None) -> np.ndarray:
        raise ValueError(f"a {cls.name} model scores pairs: it embeds no text alone")

    @classmethod
    def head_scores(cls, ranker, queries, passages, progress: bool = False) -> dict[str, np.ndarray]:
        return {"dense": ranker.score(queries, passages, progress)}

    @staticmethod
    def sequences_per_query(n_pairs: int) -> int:
        """Encoder sequences one query with ``n_pairs`` candidates costs (MACs of a query)."""
        raise NotImplementedError

    @classmethod
    def extra_costs(cls, ranker, candidates, opts, device: torch.device) -> dict:
        """Kind-specific cost columns of a results row (``opts``: ``common.evaluation.rerank.CostOptions``)."""
        return {}

    # -- loading and saving (class level; ``common.kinds.loading`` calls these)

    @classmethod
    def build(cls, path: str, tokenizer, head: str | None, pooling: str | None) -> nn.Module:
        """A fresh model of this kind from a plain directory, packaged tag or hub name (``head``,
        ``pooling``: --head, --pooling, where the kind has them)."""
        raise NotImplementedError

    @classmethod
    def check_saved_head(cls, path: str, saved_head: str, head: str | None) -> None:
        """Refuse a --head other than a checkpoint's own (``saved_head``)."""

    @classmethod
    def empty_model(cls, config, saved_head: str) -> nn.Module:
        """A checkpoint's architecture, before its structure (pruning.json) and weights are applied."""
        raise NotImplementedError

    @classmethod
    def finish_loaded(cls, model: nn.Module, config, saved_head: str) -> nn.Module:
        """The restructured checkpoint model as this kind runs it (before its weights are loaded)."""
        return model

    @classmethod
    def set_query_instruction(cls, model: nn.Module, query_instruction: str | None) -> None:
        """--query_instruction on a fresh model (refused by a kind that has no queries alone)."""
        if query_instruction:
            raise ValueError("--query_instruction is for bi-encoders (queries embedded alone)")

    @classmethod
    def save_files(cls, model: nn.Module, directory, tensors: dict) -> None:
        """What a model dir of this kind holds beside the weights, config and tokenizer."""

    @classmethod
    def stock_config(cls, model: nn.Module, config) -> tuple[str, str]:
        """For stock tools: set this kind's fields of ``config`` (a copy) and say which
        ``common.models.standalone`` class role and which ``transformers`` auto class open it."""
        raise NotImplementedError

    # -- training (an instance)

    def __init__(self, model: nn.Module, tokenizer, device: torch.device, max_length: int,
                 precision: str, length_chunk: int = 0):
        """``length_chunk``: run a batch's sequences in chunks of at most this many, of similar
        length, each padded only to its own longest (:func:`chunked_call`; 0: the batch at once)."""
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_length, self.precision, self.length_chunk = max_length, precision, length_chunk

    @classmethod
    def check_args(cls, args, model: nn.Module) -> None:
        """Refuse arguments this kind cannot train with (``ValueError``)."""

    @classmethod
    def unused_parameters(cls, model: nn.Module) -> list[str]:
        """Names of parameters no loss of this kind reaches (DDP must not wait for their gradient)."""
        return []

    @classmethod
    def label_loss(cls, args, model: nn.Module) -> tuple[str, dict]:
        """The task loss without --distill_scores: a registered loss name and its options
        (``common.training.losses.get_loss``)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, rows: list[tuple[str, ...]], wanted: tuple[str, ...]) -> Forward:
        """The student (``model``: the module that runs backward) on ``rows``; ``wanted``: the
        task loss's inputs (a kind may skip the tensors nobody asks for)."""
        raise NotImplementedError

    def teacher_forward(self, teacher: nn.Module, rows: list[tuple[str, ...]], student: Forward) -> dict:
        """The teacher on the same rows (called under ``torch.no_grad``)."""
        raise NotImplementedError

    def cache_teacher(self, teacher: nn.Module, rows, progress: bool = False) -> int:
        """--cache_teacher: the teacher's outputs for every text of ``rows`` computed once, which
        ``teacher_forward`` then looks up; the number of texts cached. Only kinds with
        ``caches_teacher`` (the Trainer refuses the flag for the others)."""
        raise NotImplementedError

    def distill_inputs(self, student: Forward, teacher: dict, target: str) -> tuple:
        """(student, teacher) arguments of the distillation loss for ``--distill_target``."""
        raise NotImplementedError

    def combine(self, task: torch.Tensor, distill: torch.Tensor, args) -> torch.Tensor:
        return task + args.distill_weight * distill
