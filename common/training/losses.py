"""Training losses as objects, looked up by name (``get_loss("margin_mse")``).

A loss is a class with a ``name``, the names of the tensors it takes (``inputs``, in call
order) and ``__call__``, which checks their shapes (one ``ValueError`` naming the expected and
the given shape) and returns a scalar tensor. ``@register_loss("name")`` makes it available
everywhere a loss is chosen by name: a new loss is one class in any file.

The inputs the training step offers (``common.training.loop.Trainer``):

* ``logits``: the cross-encoder's raw logits ``(rows * group_size, labels)``
* ``scores``: the relevance score of every pair ``(rows, group_size)``, passage 0 the positive
* ``teacher_scores``: the teacher's scores for the same pairs ``(rows, group_size)``
* ``query_embeddings`` ``(rows, dim)`` and ``passage_embeddings`` ``(rows * group_size, dim)``
  of a bi-encoder

``--distill_loss`` offers every registered loss whose inputs are ``scores, teacher_scores``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from common.registry import registrar

LOSSES: dict[str, type["Loss"]] = {}


# class decorator: the loss becomes available as ``get_loss(name)``
register_loss = registrar(LOSSES, "a loss")


def get_loss(name: str, **options) -> "Loss":
    """An instance of the loss registered as ``name`` (``options`` go to its constructor)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; registered: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**options)


def loss_class(name: str) -> type["Loss"] | None:
    return LOSSES.get(name)


def score_distillation_losses() -> list[str]:
    """Losses that train on teacher scores (the choices of ``--distill_loss``)."""
    return [n for n, cls in LOSSES.items() if cls.inputs == ("scores", "teacher_scores")]


def _shape_error(loss: str, what: str, expected: str, given: torch.Tensor) -> ValueError:
    return ValueError(f"{loss}: {what} must have shape {expected}, got {tuple(given.shape)}")


class Loss:
    name: str = ""
    inputs: tuple[str, ...] = ()
    listwise: bool = False  # True: any number of passages per row (else pairs: 2)

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        self.check(*tensors)
        return self.compute(*tensors)

    def check(self, *tensors: torch.Tensor) -> None:
        """Raise ``ValueError`` when the inputs do not have the shapes ``compute`` needs."""

    def compute(self, *tensors: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # shape checks shared by the losses below
    def _rows(self, what: str, tensor: torch.Tensor, width: int | None = None) -> None:
        """``tensor`` is ``(rows, width)`` (``width`` None: any width >= 2)."""
        ok = tensor.dim() == 2 and (tensor.shape[1] == width if width else tensor.shape[1] >= 2)
        if not ok:
            raise _shape_error(self.name, what, f"(rows, {width or 'passages >= 2'})", tensor)

    def _same(self, what: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            raise _shape_error(self.name, what, str(tuple(a.shape)), b)


@register_loss("cross_entropy")
class CrossEntropy(Loss):
    """The 2-label classifier (monoBERT): label 1 for each row's positive, 0 for its negative."""

    inputs = ("logits",)

    def check(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != 2 or logits.shape[0] % 2:
            raise _shape_error(self.name, "logits", "(2 * rows, 2): (positive, negative) pairs of "
                               "a 2-label head", logits)

    def compute(self, logits: torch.Tensor) -> torch.Tensor:
        labels = torch.tensor([1, 0] * (logits.shape[0] // 2), device=logits.device)
        return F.cross_entropy(logits, labels)


@register_loss("row_softmax")
class RowSoftmax(Loss):
    """Cross-entropy of a softmax over each row's passages, the first the relevant one (the
    segment-cosine head, which gives one score per pair)."""

    inputs = ("scores",)
    listwise = True

    def check(self, scores: torch.Tensor) -> None:
        self._rows("scores", scores)

    def compute(self, scores: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scores, torch.zeros(scores.shape[0], dtype=torch.long,
                                                   device=scores.device))


@register_loss("margin_mse")
class MarginMSE(Loss):
    """MSE between the student's (positive - negative) score margin and the teacher's."""

    inputs = ("scores", "teacher_scores")

    def check(self, scores: torch.Tensor, teacher: torch.Tensor) -> None:
        self._rows("scores", scores, 2)
        self._same("teacher_scores", scores, teacher)

    def compute(self, scores: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(scores[:, 0] - scores[:, 1], teacher[:, 0] - teacher[:, 1])


@register_loss("kl")
class ListwiseKL(Loss):
    """KL(teacher softmax || student softmax) over each row's passages, mean over rows."""

    inputs = ("scores", "teacher_scores")
    listwise = True

    def check(self, scores: torch.Tensor, teacher: torch.Tensor) -> None:
        self._rows("scores", scores)
        self._same("teacher_scores", scores, teacher)

    def compute(self, scores: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(scores, dim=-1), F.log_softmax(teacher, dim=-1),
                        log_target=True, reduction="batchmean")


@register_loss("in_batch_contrastive")
class InBatchContrastive(Loss):
    """Bi-encoder: each query against every passage of the batch (``temperature``-scaled dot
    products), its own positive - passage ``i * k`` of ``k`` per query - the target."""

    inputs = ("query_embeddings", "passage_embeddings")

    def __init__(self, temperature: float = 0.02):
        self.temperature = temperature

    def check(self, queries: torch.Tensor, passages: torch.Tensor) -> None:
        if queries.dim() != 2:
            raise _shape_error(self.name, "query_embeddings", "(rows, dim)", queries)
        rows, dim = queries.shape
        if passages.dim() != 2 or passages.shape[1] != dim or not rows or passages.shape[0] % rows:
            raise _shape_error(self.name, "passage_embeddings", f"(k * {rows}, {dim})", passages)

    def compute(self, queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
        logits = queries @ passages.T / self.temperature
        per_query = passages.shape[0] // queries.shape[0]
        target = torch.arange(queries.shape[0], device=queries.device) * per_query
        return F.cross_entropy(logits, target)


@register_loss("embedding_mse")
class EmbeddingMSE(Loss):
    """Squared L2 between student and teacher embeddings, mean over texts, summed over the
    given groups (e.g. queries and passages). For unit vectors it is 2 (1 - cos) per text."""

    inputs = ("embeddings", "teacher_embeddings")

    def check(self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor]) -> None:
        if not students or len(students) != len(teachers):
            raise ValueError(f"{self.name}: expected as many teacher embedding tensors as student "
                             f"ones (>= 1), got {len(teachers)} for {len(students)}")
        for s, t in zip(students, teachers):
            if s.dim() != 2:
                raise _shape_error(self.name, "embeddings", "(texts, dim)", s)
            self._same("teacher_embeddings", s, t)

    def compute(self, students: Sequence[torch.Tensor], teachers: Sequence[torch.Tensor]) -> torch.Tensor:
        total = None
        for s, t in zip(students, teachers):
            term = ((s - t.float()) ** 2).sum(-1).mean()
            total = term if total is None else total + term
        return total
