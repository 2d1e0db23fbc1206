"""Model kinds in training: each kind owns its training forward and its loss inputs.

:class:`CrossKind` (one sequence per (query, passage) pair) and :class:`BiKind` (queries and
passages embedded alone, cosine scores) tokenise a batch of training rows, run the student,
and offer the tensors the losses of ``common.training.losses`` take (``Forward.inputs``); they run the
teacher of ``--distill_from`` on the same rows, say which tensors that distillation compares,
how the task and distillation losses combine, which task loss trains on labels, and which
arguments the kind refuses. ``common.training.loop.Trainer`` calls this interface and never branches
on the kind; scoring (evaluation, 05, bench) is ``common.serving.rank.Ranker``'s kind classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.models import m3
from common.models.encoders import embedding_of, max_length_of, with_prompt
from common.training.losses import Loss, get_loss
from common.models.loading import autocast_context, encode_pairs, pooling_of, relevance_logit
from common.models.segment import is_segment


def pair_cosines(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """Bi-encoder scores ``(rows, 2)``: each query's dot product with its positive and its
    negative (``passages`` holds them in that order, row by row)."""
    return (queries[:, None, :] * passages.view(len(queries), 2, -1)).sum(-1)


@dataclass
class Forward:
    """One forward pass over training rows: the loss inputs it offers, the tokenised batch the
    pruning callback sees, and what the distillation needs of it (``extra``)."""

    inputs: dict[str, torch.Tensor]
    batch: dict
    extra: dict


class TrainingKind:
    """The training side of a model kind, bound to the student's tokenizer and layout."""

    name = ""
    task_key = "task"  # the task loss's key in the logged train events
    distill_beside_scores = True  # with --distill_scores, is --distill_from still trained on?

    def __init__(self, model: nn.Module, tokenizer, device: torch.device, max_length: int,
                 precision: str):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_length, self.precision = max_length, precision

    @classmethod
    def check_args(cls, args, model: nn.Module) -> None:
        """Refuse arguments this kind cannot train with (``ValueError``)."""

    @classmethod
    def label_loss(cls, args, model: nn.Module) -> Loss:
        """The task loss without --distill_scores."""
        raise NotImplementedError

    def forward(self, model: nn.Module, rows: list[tuple[str, ...]], wanted: tuple[str, ...]) -> Forward:
        """The student (``model``: the module that runs backward) on ``rows``; ``wanted``: the
        task loss's inputs (a kind may skip the tensors nobody asks for)."""
        raise NotImplementedError

    def teacher_forward(self, teacher: nn.Module, rows: list[tuple[str, ...]], student: Forward) -> dict:
        """The teacher on the same rows (called under ``torch.no_grad``)."""
        raise NotImplementedError

    def distill_inputs(self, student: Forward, teacher: dict, target: str) -> tuple:
        """(student, teacher) arguments of the distillation loss for ``--distill_target``."""
        raise NotImplementedError

    def combine(self, task: torch.Tensor, distill: torch.Tensor, args) -> torch.Tensor:
        return task + args.distill_weight * distill


class CrossKind(TrainingKind):
    """Cross-encoder: the task loss on the scores of each row's passages (or the 2-label
    logits), distillation on the teacher's scores or (segment head) its segment embeddings."""

    name = "cross"

    @classmethod
    def check_args(cls, args, model):
        if args.distill_target == "embeddings" and not is_segment(model):
            raise ValueError("--distill_target embeddings needs a bi-encoder or the segment_cosine head")

    @classmethod
    def label_loss(cls, args, model):
        one_score = is_segment(model) or model.config.num_labels == 1  # a 1-label head: listwise
        return get_loss("row_softmax" if one_score else "cross_entropy")

    def forward(self, model, rows, wanted):
        n = len(rows[0]) - 1
        queries = [row[0] for row in rows for _ in range(n)]
        passages = [x for row in rows for x in row[1:]]
        batch = encode_pairs(self.tokenizer, queries, passages, self.max_length, self.model).to(self.device)
        with autocast_context(self.device, self.precision):
            output = model(**batch)
        logits = output.logits.float()
        student = relevance_logit(logits).view(len(rows), n)
        return Forward({"logits": logits, "scores": student}, batch, {"output": output, "rows": n})

    def teacher_forward(self, teacher, rows, student):
        with autocast_context(self.device, self.precision):
            return {"output": teacher(**student.batch)}

    def distill_inputs(self, student, teacher, target):
        if target == "embeddings":
            keys = ("query_embeddings", "passage_embeddings")
            return ([getattr(student.extra["output"], k) for k in keys],
                    [getattr(teacher["output"], k) for k in keys])
        scores = student.inputs["scores"]
        return scores, relevance_logit(teacher["output"].logits.float()).view(*scores.shape)


class BiKind(TrainingKind):
    """Bi-encoder: in-batch contrastive on the query and passage embeddings (the task loss),
    distillation on the teacher's cosine scores or embeddings; with --distill_scores the task
    loss alone (--distill_from is not used then).

    With a query encoder (``--query_encoder``: ``query_encoder`` is set to that frozen model)
    the student embeds passages only: the queries' embeddings come from the query encoder
    without gradient, the scores are its queries against the student's passages, and embedding
    distillation compares passage embeddings only (the student's queries are never used)."""

    name = "bi"
    task_key = "contrastive"
    distill_beside_scores = False
    query_encoder: nn.Module | None = None

    @classmethod
    def check_args(cls, args, model):
        if args.group_size != 2 or args.distill_loss != "margin_mse":
            raise ValueError("bi-encoders train on triples (--group_size 2, --distill_loss margin_mse)")
        if m3.heads_of(model) is not None and (args.query_encoder or args.distill_scores):
            raise ValueError("a bi-encoder with sparse/ColBERT heads trains with the unified in-batch loss "
                             "on its own queries: drop --query_encoder and --distill_scores")

    @classmethod
    def label_loss(cls, args, model):
        if m3.heads_of(model) is not None:  # BGE-M3 unified training with self-distillation
            return get_loss("m3_self_distill", temperature=args.temperature)
        return get_loss("in_batch_contrastive", temperature=args.temperature)

    def embed(self, model: nn.Module, texts: list[str], role: str,
              owner: nn.Module | None = None) -> tuple[torch.Tensor, dict]:
        """L2-normalised embeddings of ``texts`` as ``role`` (query / passage): ``owner``'s
        sentence-transformers chain (its prompt, maximum length, pooling, Dense layers;
        ``common.models.encoders``) around ``model`` (``owner`` itself, or its DDP wrapper)."""
        owner = owner if owner is not None else model
        batch = self.tokenizer(with_prompt(owner, texts, role), truncation=True,
                               max_length=max_length_of(owner, self.max_length),
                               padding=True, return_tensors="pt").to(self.device)
        with autocast_context(self.device, self.precision):
            hidden = model(**batch).last_hidden_state
        return F.normalize(embedding_of(owner, hidden.float(), batch["attention_mask"]), dim=-1), batch

    def embed_layers(self, model: nn.Module, texts: list[str], role: str) -> list[torch.Tensor]:
        """The embeddings of the model cut after each layer, from ONE forward pass: every
        layer's hidden states pooled (a decoder's through its final norm, as the cut model
        applies it), index k-1 for the first k layers (``common.pruning.l3prune``)."""
        from common.models.arch import adapter_for, get_module
        batch = self.tokenizer(with_prompt(model, texts, role), truncation=True,
                               max_length=max_length_of(model, self.max_length),
                               padding=True, return_tensors="pt").to(self.device)
        adapter = adapter_for(model.config)
        norm = get_module(model.base_model, adapter.final_norm) if adapter.final_norm else None
        with autocast_context(self.device, self.precision):
            states = model(**batch, output_hidden_states=True).hidden_states[1:]
            if norm is not None:  # the last entry is already normed (it is last_hidden_state)
                states = [norm(h) for h in states[:-1]] + [states[-1]]
        return [F.normalize(embedding_of(model, h.float(), batch["attention_mask"]), dim=-1) for h in states]

    def _texts(self, rows):
        """The rows' queries and passages (``embed`` puts each role's prompt before them)."""
        return [row[0] for row in rows], [x for _q, p, n in rows for x in (p, n)]

    def embed_heads(self, model: nn.Module, texts: list[str]) -> tuple[dict, dict]:
        """Every head's representation (``common.models.m3.represent``) of ``texts``."""
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length,
                               padding=True, return_tensors="pt").to(self.device)
        with autocast_context(self.device, self.precision):
            hidden = model(**batch).last_hidden_state
        return m3.represent(hidden.float(), batch, pooling_of(self.model), m3.heads_of(self.model)), batch

    def forward(self, model, rows, wanted):
        queries, passages = self._texts(rows)
        if "head_scores" in wanted:
            q, _ = self.embed_heads(model, queries)
            p, batch = self.embed_heads(model, passages)
            inputs = {"query_embeddings": q["dense"], "passage_embeddings": p["dense"],
                      "head_scores": m3.score_matrices(q, p, combined=False)}
            if "scores" in wanted:
                inputs["scores"] = pair_cosines(q["dense"], p["dense"])
            return Forward(inputs, batch, {})
        if self.query_encoder is None:
            q, _ = self.embed(model, queries, "query", self.model)
        else:
            with torch.no_grad():
                q, _ = self.embed(self.query_encoder, queries, "query")
        p, batch = self.embed(model, passages, "passage", self.model)
        inputs = {"query_embeddings": q, "passage_embeddings": p}
        if "scores" in wanted:
            inputs["scores"] = pair_cosines(q, p)
        return Forward(inputs, batch, {})

    def teacher_forward(self, teacher, rows, student):
        queries, passages = self._texts(rows)
        tq, _ = self.embed(teacher, queries, "query")
        tp, _ = self.embed(teacher, passages, "passage")
        return {"query_embeddings": tq, "passage_embeddings": tp}

    def distill_inputs(self, student, teacher, target):
        q, p = student.inputs["query_embeddings"], student.inputs["passage_embeddings"]
        tq, tp = teacher["query_embeddings"], teacher["passage_embeddings"]
        if target == "embeddings":
            return ([p], [tp]) if self.query_encoder is not None else ([q, p], [tq, tp])
        return pair_cosines(q, p), pair_cosines(tq, tp)

    def combine(self, task, distill, args):
        return args.contrastive_weight * task + args.distill_weight * distill


KINDS: dict[str, type[TrainingKind]] = {"cross": CrossKind, "bi": BiKind}
