"""L3Prune layer selection (Thennal, Fischer & Biemann 2024, "Large Language Models Are
Overparameterized Text Encoders"): how many of the first layers to keep, chosen from the
unpruned model's loss at every depth.

For each depth k = 1..L the model cut after layer k (the layer-dropping baseline's model,
``common.models.loading.keep_first_layers``: the kind's own pooling and head on the k-th layer's
output) is scored with the kind's task loss on labels (cross-encoder: cross-entropy of the
2-label head or the segment head's row softmax; bi-encoder: in-batch contrastive over the
positives and negatives) on the first ``rows`` training triples, no gradient. A bi-encoder's
losses at every depth come from one forward pass per batch (every layer's hidden states pooled:
``BiKind.embed_layers``), so an LLM encoder is run once, not once per depth; a cross-encoder's
head is family-specific and it is cut and run at each depth. The two
configurations, as we read the paper: ``large`` keeps the depth with the lowest loss (the
global minimum; the shallower one on a tie), ``small`` the first local minimum (the first depth
whose loss is not above the next one's). A model whose loss falls all the way down (a model
already trained for the task) keeps every layer in both.
"""
from __future__ import annotations

import copy
import json
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import torch

from common.data.formats import TriplesStream
from common.kinds import BiKind, kind_of
from common.kinds.bi import pair_cosines
from common.models.loading import keep_first_layers
from common.kinds.loading import LoadedModel, load_model
from common.serving.rank import check_query_encoder, query_encoder_of
from common.training.loop import TrainArgs, apply_loss
from common.training.losses import get_loss

RULES = ("small", "large")


def parse_keep_layers(value: str) -> str | int | float:
    """``--keep_layers``: ``small`` / ``large`` (L3Prune's choice), a count N >= 1 (keep the first N
    layers) or a fraction p in (0, 1) (prune that share, as L3Prune's ``prune(p)``: keep
    ``int(L * (1 - p))``). Anything else is a ``ValueError``."""
    if value in RULES:
        return value
    try:
        return int(value) if int(value) >= 1 else _bad_keep(value)
    except ValueError:
        pass
    try:
        share = float(value)
    except ValueError:
        return _bad_keep(value)
    return share if 0 < share < 1 else _bad_keep(value)


def _bad_keep(value: str):
    raise ValueError(f"--keep_layers {value}: expected {' or '.join(RULES)}, a layer count >= 1, or a "
                     "fraction of layers to prune in (0, 1)")


def layers_to_keep(spec: int | float, total: int) -> int:
    """The layer count ``spec`` (a count or a pruned share, :func:`parse_keep_layers`) keeps of ``total``."""
    if isinstance(spec, float):
        n = int(total * (1 - spec))
        if n < 1:
            raise ValueError(f"--keep_layers {spec}: pruning that share of {total} layers leaves none")
        return n
    if not 1 <= spec <= total:
        raise ValueError(f"--keep_layers {spec}: the model has {total} layers (keep 1..{total})")
    return spec


@torch.no_grad()
def layerwise_losses(loaded: LoadedModel, triples_file: str, rows: int = 256, batch_size: int = 32,
                     max_length: int = 128) -> list[float]:
    """Mean task loss of the model cut after each layer (index k-1: the first k layers)."""
    data = list(islice(iter(TriplesStream(triples_file)), rows))
    if not data:
        raise ValueError(f"{triples_file}: no triples")
    per_step = max(1, batch_size // 2)
    args = SimpleNamespace(temperature=TrainArgs.temperature)
    device = next(loaded.model.parameters()).device
    losses = []
    depth = loaded.state.num_layers
    queries = None  # an asymmetric bi-encoder: its queries go through its frozen query encoder
    pairs = kind_of(loaded.kind).pairs
    name = query_encoder_of(loaded) if not pairs else None
    if name:
        encoder = load_model(name, device, kind=BiKind.name)
        check_query_encoder(loaded, encoder, name)
        queries = encoder.model.eval()
    if not pairs:
        return _bi_layerwise_losses(loaded, data, per_step, args, device, max_length, queries)
    for k in range(1, depth + 1):
        cut = copy.copy(loaded)
        cut.model = copy.deepcopy(loaded.model)
        cut.state = copy.deepcopy(loaded.state)
        if k < depth:
            keep_first_layers(cut, k)
        cut.model.eval()
        kind = kind_of(loaded.kind)(cut.model, loaded.tokenizer, device, max_length, "fp32")
        if queries is not None:
            kind.query_encoder = queries
        loss_name, options = kind.label_loss(args, cut.model)
        loss = get_loss(loss_name, **options)
        total = count = 0
        for start in range(0, len(data), per_step):
            chunk = data[start:start + per_step]
            forward = kind.forward(cut.model, chunk, loss.inputs)
            total += float(apply_loss(loss, forward.inputs)) * len(chunk)
            count += len(chunk)
        losses.append(total / count)
    return losses


def _bi_layerwise_losses(loaded: LoadedModel, data, per_step: int, args, device, max_length: int,
                         query_encoder) -> list[float]:
    """Every depth's contrastive loss from one forward pass per batch (see the module docstring)."""
    was_training = loaded.model.training
    loaded.model.eval()
    kind = kind_of(loaded.kind)(loaded.model, loaded.tokenizer, device, max_length, "fp32")
    loss_name, options = kind.label_loss(args, loaded.model)
    loss = get_loss(loss_name, **options)
    totals = [0.0] * loaded.state.num_layers
    try:
        for start in range(0, len(data), per_step):
            chunk = data[start:start + per_step]
            queries, passages = kind._texts(chunk)
            if query_encoder is not None:
                kind.query_encoder = query_encoder
                q_layers = [kind.embed(query_encoder, queries, "query")[0]] * len(totals)
            else:
                q_layers = kind.embed_layers(loaded.model, queries, "query")
            p_layers = kind.embed_layers(loaded.model, passages, "passage")
            for k, (q, p) in enumerate(zip(q_layers, p_layers)):
                inputs = {"query_embeddings": q, "passage_embeddings": p, "scores": pair_cosines(q, p)}
                totals[k] += float(apply_loss(loss, inputs)) * len(chunk)
    finally:
        loaded.model.train(was_training)
    return [t / len(data) for t in totals]


def earlier_layer_losses(path: str, source: dict) -> dict:
    """The ``l3prune`` note of an earlier L3Prune drop (its output dir or ``pruning.json``), so that
    ``small`` and ``large`` come from one layerwise loss. ``source`` (checkpoint, pooling, query
    instruction, length) must be what that loss was computed on; a ``ValueError`` names what differs."""
    file = Path(path) / "pruning.json" if Path(path).is_dir() else Path(path)
    try:
        history = json.loads(file.read_text())["history"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--layer_losses {file}: not the pruning.json of a reshaped model ({err})") from None
    notes = [h["l3prune"] for h in history if isinstance(h, dict) and isinstance(h.get("l3prune"), dict)]
    if not notes or not isinstance(notes[-1].get("losses"), list):
        raise ValueError(f"--layer_losses {file}: no L3Prune layerwise loss in it (reshaped with --keep_layers "
                         "small|large and --layer_loss_triples?)")
    note = notes[-1]
    for key, value in source.items():
        theirs = note.get(key)
        same = theirs == value or (key == "checkpoint" and isinstance(theirs, str)
                                   and Path(theirs).exists() and Path(value).exists()
                                   and Path(theirs).resolve() == Path(value).resolve())
        if not same:
            raise ValueError(f"--layer_losses {file}: its loss was computed with {key} {theirs!r}, this drop "
                             f"has {value!r}")
    return note


def choose(losses: list[float]) -> dict[str, int]:
    """``{"small": layers, "large": layers}`` from the loss of each depth."""
    if not losses:
        raise ValueError("no layer losses")
    large = min(range(len(losses)), key=lambda i: (losses[i], i)) + 1
    small = next((i + 1 for i in range(len(losses) - 1) if losses[i] <= losses[i + 1]), len(losses))
    return {"small": small, "large": large}
