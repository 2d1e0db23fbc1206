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

from common.models.m3 import ENSEMBLE_WEIGHTS, HEAD_NAMES, ensemble
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
    shift_invariant: bool = False  # True: one constant added to every score of a row changes nothing
    in_batch: bool = False  # True: rows are each other's negatives: under DDP, over the global batch

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
    shift_invariant = True
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
    shift_invariant = True

    def check(self, scores: torch.Tensor, teacher: torch.Tensor) -> None:
        self._rows("scores", scores, 2)
        self._same("teacher_scores", scores, teacher)

    def compute(self, scores: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(scores[:, 0] - scores[:, 1], teacher[:, 0] - teacher[:, 1])


@register_loss("kl")
class ListwiseKL(Loss):
    """KL(teacher softmax || student softmax) over each row's passages, mean over rows."""

    inputs = ("scores", "teacher_scores")
    shift_invariant = True
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
    in_batch = True

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


# -- BGE-M3's unified fine-tuning (the heads of common.models.m3) --------------------------------
def soft_cross_entropy(student: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """``-mean_rows sum_j t_j log softmax(s)_j``: KL(t || softmax(s)) up to the teacher's entropy
    (FlagEmbedding's ``kl_div`` distillation loss)."""
    return -(teacher_probs * torch.log_softmax(student, dim=-1)).sum(-1).mean()


HEAD_LOSS_WEIGHTS = {"dense": 1.0, "sparse": 0.1, "colbert": 1.0}  # the seed's weight of each head's own losses


def self_distill_loss(scores: dict[str, torch.Tensor], target: torch.Tensor,
                      weights: dict[str, float] = ENSEMBLE_WEIGHTS, self_distill: bool = True) -> torch.Tensor:
    """Unified fine-tuning loss of the heads (scores ``[rows, candidates]`` each, already divided
    by the temperature; ``target``: the positive's column of each row). With all three heads:

        task = (CE(dense) + CE(ensemble) + 0.1 CE(sparse) + CE(colbert)) / 4
        with self-distillation, t = softmax(ensemble) (no gradient):
        loss = (task + (SCE(dense, t) + 0.1 SCE(sparse, t) + SCE(colbert, t)) / 3) / 2

    ``ensemble = 1 * dense + 0.3 * sparse + 1 * colbert`` (``weights``); SCE is
    :func:`soft_cross_entropy`; the 0.1 on the sparse terms is the seed's (its sparse scores are
    on another scale than the other two). With two heads the same form over those two."""
    if "dense" not in scores or set(scores) - set(HEAD_NAMES) or len(scores) < 2:
        raise ValueError(f"unified training needs dense and at least one of sparse, colbert; got {sorted(scores)}")
    ens = ensemble(scores, weights)
    task = F.cross_entropy(ens, target)
    for name, value in scores.items():
        task = task + HEAD_LOSS_WEIGHTS[name] * F.cross_entropy(value, target)
    loss = task / (len(scores) + 1)
    if not self_distill:
        return loss
    teacher = torch.softmax(ens.detach(), dim=-1)
    distill = sum(HEAD_LOSS_WEIGHTS[name] * soft_cross_entropy(value, teacher) for name, value in scores.items())
    return (loss + distill / len(scores)) / 2


@register_loss("m3_self_distill")
class M3SelfDistill(Loss):
    """Bi-encoder with BGE-M3 heads: :func:`self_distill_loss` over in-batch negatives (each
    query against every passage of the batch, its own positive, passage ``i * k``, the target),
    every head's scores divided by ``temperature`` as the seed does."""

    inputs = ("head_scores",)

    def __init__(self, temperature: float = 0.02, self_distill: bool = True):
        self.temperature, self.self_distill = temperature, self_distill

    def check(self, head_scores: dict) -> None:
        shapes = {tuple(v.shape) for v in head_scores.values()}
        rows, cols = next(iter(shapes)) if len(shapes) == 1 else (0, 0)
        if len(shapes) != 1 or not rows or cols % rows:
            raise ValueError(f"m3_self_distill: head scores must share one shape (rows, k * rows), got {shapes}")

    def compute(self, head_scores: dict) -> torch.Tensor:
        rows, cols = next(iter(head_scores.values())).shape
        target = torch.arange(rows, device=next(iter(head_scores.values())).device) * (cols // rows)
        scaled = {name: value / self.temperature for name, value in head_scores.items()}
        return self_distill_loss(scaled, target, self_distill=self.self_distill)
