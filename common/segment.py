"""The segment-cosine cross-encoder head: a cross-encoder that starts as its own bi-encoder.

A pair is laid out as two segments in one sequence, ``[CLS] q [SEP] [CLS] p [SEP]``: each
segment is tokenised as the bi-encoder tokenises a text alone, the passage's position ids
restart at 0 and every token has token type 0. In every layer a token attends to the tokens of
its own segment with the usual softmax weights and to the other segment's tokens with those
weights multiplied by a learned per-layer gate ``alpha_l = max(g_l, 0)`` (its gradient passes
straight through the max, so a shut gate can open again)::

    w_ij = exp(s_ij) * m_ij / sum_k exp(s_ik) * m_ik,   m_ij = 1 (same segment) | alpha_l (cross)

The gates start at exactly 0, so at step 0 the two segments are encoded independently, exactly
as the bi-encoder encodes the query and the passage; each segment is pooled as the bi-encoder
pools a text (mean over its tokens, or its first token) and the pair's score is

    score = scale * cos(pool(q segment), pool(p segment)) + w . h_[CLS of p]

with ``scale`` learned (starting at :data:`SCALE_INIT`) and ``w`` a zero-initialised linear
term on the final state of the passage segment's [CLS] (the first token, the query's [CLS],
would see nothing of the passage while the gates are shut, so a pairwise loss gives it no
gradient; the passage's [CLS] sees the passage from the start and the query as the gates open). Step 0 therefore *is* the bi-encoder's scoring function
(a test checks 1e-5); the gradient of the loss with respect to ``alpha_l`` at 0 is finite (the
weights are multiplicative, not a -inf logit), so training can open cross-segment attention
wherever it helps. :func:`cross_attention_mass` reports how much it did.

The segments are derived from the input ids (segment 1 starts after the first separator), so
any pair batch works: our layout from :func:`encode_segment_pairs`, or a tokenizer's own pair
template (``[CLS] a [SEP] b [SEP]``, used for worst-case cost inputs). ``token_type_ids``
are ignored (one type). The head lives in the config (``slimrank_head``), so a checkpoint
knows it; :func:`common.modeling.load_model` rebuilds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.utils import ModelOutput

from common.arch import adapter_for, get_module, layer_stack

HEAD = "segment_cosine"
HEADS = ("classifier", HEAD)  # classifier: the monoBERT 2-label head
ATTENTION = "slimrank_segment"
SCALE_INIT = 10.0  # the recipes' --distill_scale: teacher cosines x 10
QUERY_MAX_TOKENS = 32  # the query segment, special tokens included


def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask, scaling: float | None = None,
                      dropout: float = 0.0, segment_ids: torch.Tensor | None = None,
                      cross_gates: torch.Tensor | None = None, segment_weights: bool = False,
                      **_kwargs):
    """Attention with gated cross-segment weights (module doc); returns (context, weights).

    ``segment_ids`` ``(B, T)``: 0 query, 1 passage, -1 padding. With gradients (training) or
    when the probabilities are asked for (``segment_weights``: head confidence, the
    cross-attention report) the softmax is computed here in float32 with multiplicative gates,
    whose gradient at 0 is finite. Otherwise (inference) the same function runs as PyTorch's
    fused ``scaled_dot_product_attention`` with the gates as an additive ``log(alpha)`` mask
    (-inf while shut): equal up to rounding, and as fast as the stock model."""
    if segment_ids is None or cross_gates is None:
        raise ValueError("segment attention needs segment_ids and cross_gates "
                         "(call the model through SegmentCrossEncoder)")
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    gate = cross_gates[module.slimrank_layer].float()
    valid = segment_ids >= 0
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if not (segment_weights or torch.is_grad_enabled()):
        # padding rows attend to padding keys only (never all -inf, so never NaN)
        log_alpha = torch.log(gate.clamp(min=0.0))
        bias = torch.where(same, torch.zeros_like(log_alpha), log_alpha)
        bias = bias.masked_fill(valid[:, :, None] & ~valid[:, None, :], float("-inf"))
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias[:, None].to(query.dtype),
                                                 scale=scaling)
        return context.transpose(1, 2).contiguous(), None
    logits = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    # max(g, 0) forward, identity backward: a gate pushed below 0 is shut but not dead
    alpha = gate + (gate.clamp(min=0.0) - gate).detach()
    weight = torch.where(same, torch.ones_like(alpha), alpha) * valid[:, None, :]
    logits = logits.masked_fill(~valid[:, None, None, :], torch.finfo(logits.dtype).min)
    probs = torch.exp(logits - logits.amax(dim=-1, keepdim=True)) * weight[:, None]
    probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    probs = F.dropout(probs, p=dropout, training=module.training)
    context = torch.matmul(probs.to(value.dtype), value).transpose(1, 2).contiguous()
    return context, probs


AttentionInterface.register(ATTENTION, segment_attention)


def segments_from_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep_token_id: int):
    """(segment ids, position ids): segment 1 starts after the first separator; padding -1;
    positions count from 0 in each segment."""
    is_sep = (input_ids == sep_token_id).long()
    seps_before = torch.cumsum(is_sep, dim=1) - is_sep
    segment = seps_before.clamp(max=1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    start = torch.where(segment == 1, positions, torch.full_like(positions, input_ids.shape[1]))
    start = start.amin(dim=1, keepdim=True)
    position_ids = torch.where(segment == 1, positions - start, positions)
    segment = segment.masked_fill(attention_mask == 0, -1)
    return segment, position_ids


@dataclass
class SegmentOutput(ModelOutput):
    logits: torch.Tensor | None = None  # (B, 1): the score
    query_embeddings: torch.Tensor | None = None  # (B, hidden), L2-normalised
    passage_embeddings: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


class SegmentCrossEncoder(nn.Module):
    """A bare transformers encoder plus the segment-cosine head (module doc)."""

    def __init__(self, encoder: nn.Module, sep_token_id: int | None = None):
        """``sep_token_id`` (the tokenizer's separator) is needed for a fresh head; a saved
        config carries it (``slimrank_sep_token_id``)."""
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's pooler: unused here (and unused weights break DDP)
        self.encoder = encoder
        config = encoder.config
        self.config = config
        config.slimrank_head = HEAD
        if sep_token_id is not None:
            config.slimrank_sep_token_id = int(sep_token_id)
        if getattr(config, "slimrank_sep_token_id", None) is None:
            raise ValueError("the segment head needs the tokenizer's sep_token_id")
        adapter = adapter_for(config)
        layers = layer_stack(encoder, adapter)
        for i, layer in enumerate(layers):
            get_module(layer, adapter.attention).slimrank_layer = i
        encoder.set_attn_implementation(ATTENTION)
        self.cross_gate = nn.Parameter(torch.zeros(len(layers)))
        self.scale = nn.Parameter(torch.tensor(SCALE_INIT))
        # no bias: a constant shifts every pair's score alike (no ranking loss sees it, and
        # AdamW would turn its round-off gradient into full-size steps)
        self.cls_linear = nn.Linear(getattr(config, adapter.cfg_hidden), 1, bias=False)
        nn.init.zeros_(self.cls_linear.weight)
        # RoBERTa counts positions from padding_idx + 1
        self.position_offset = config.pad_token_id + 1 if config.model_type == "roberta" else 0
        self.need_weights = False

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def set_attn_implementation(self, name: str) -> None:
        """``eager``: return attention probabilities (head confidence asks so); anything else:
        the fused kernel when no gradient is needed (see :func:`segment_attention`)."""
        self.need_weights = name == "eager"

    def keep_layers(self, n: int) -> None:
        self.cross_gate = nn.Parameter(self.cross_gate.data[:n].clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, return_dict: bool = True,
                **_kwargs) -> SegmentOutput:
        segment, position_ids = segments_from_ids(input_ids, attention_mask,
                                                  self.config.slimrank_sep_token_id)
        kwargs = {"token_type_ids": torch.zeros_like(input_ids)}
        if self.config.model_type == "distilbert":
            kwargs = {}
        hidden = self.encoder(input_ids=input_ids, position_ids=position_ids + self.position_offset,
                              segment_ids=segment, cross_gates=self.cross_gate,
                              segment_weights=self.need_weights, **kwargs).last_hidden_state
        pooling = getattr(self.config, "slimrank_pooling", "mean")
        q, p = (_pool(hidden, segment == s, pooling) for s in (0, 1))
        q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
        first_p = (segment == 1).float().argmax(dim=1)  # the passage segment's [CLS]
        cls = hidden[torch.arange(hidden.shape[0], device=hidden.device), first_p]
        score = self.scale * (q * p).sum(-1, keepdim=True) + self.cls_linear(cls).float()
        return SegmentOutput(logits=score, query_embeddings=q, passage_embeddings=p,
                             last_hidden_state=hidden)


def _pool(hidden: torch.Tensor, member: torch.Tensor, pooling: str) -> torch.Tensor:
    mask = member.unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":  # the segment's first token
        first = member.float().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def is_segment(model: nn.Module) -> bool:
    return getattr(model.config, "slimrank_head", None) == HEAD


def encode_segment_pairs(tokenizer, queries: list[str], passages: list[str], max_length: int,
                         padding: bool = True, return_tensors: str | None = "pt"):
    """``[CLS] q [SEP] [CLS] p [SEP]`` features: the query segment keeps up to
    :data:`QUERY_MAX_TOKENS` tokens, the passage segment fills the rest of ``max_length``
    (each segment tokenised alone, ending with its separator). Distinct texts are tokenised
    once."""
    q_budget = min(QUERY_MAX_TOKENS, max_length // 2)
    uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
    up, pi = np.unique(np.asarray(passages, dtype=object), return_inverse=True)
    q_ids = tokenizer([str(t) for t in uq], truncation=True, max_length=q_budget)["input_ids"]
    p_ids = tokenizer([str(t) for t in up], truncation=True, max_length=max_length)["input_ids"]
    features = {"input_ids": [], "attention_mask": []}
    for a, b in zip(qi, pi):
        q, p = q_ids[a], p_ids[b]
        room = max_length - len(q)
        if len(p) > room:
            p = p[:room - 1] + p[-1:]
        ids = q + p
        features["input_ids"].append(ids)
        features["attention_mask"].append([1] * len(ids))
    if not padding:
        return features
    return tokenizer.pad(features, return_tensors=return_tensors)


@torch.no_grad()
def cross_attention_mass(model: SegmentCrossEncoder, batch: dict) -> float:
    """Mean share of attention probability a non-padding token puts on the other segment,
    over layers, heads and tokens (0: the model is still a bi-encoder)."""
    segment, _ = segments_from_ids(batch["input_ids"], batch["attention_mask"],
                                   model.config.slimrank_sep_token_id)
    adapter = adapter_for(model.config)
    shares, handles = [], []
    other = (segment[:, :, None] != segment[:, None, :]) & (segment[:, None, :] >= 0)
    valid = segment >= 0

    def hook(_module, _args, output):
        probs = output[1]  # (B, H, T, T)
        if probs is None:
            return
        mass = (probs * other[:, None].to(probs.dtype)).sum(-1)  # (B, H, T)
        shares.append(float((mass * valid[:, None]).sum() / (valid.sum() * probs.shape[1])))

    for layer in layer_stack(model, adapter):
        handles.append(get_module(layer, adapter.attention).register_forward_hook(hook))
    was_training, was_weights = model.training, model.need_weights
    model.eval()
    model.need_weights = True
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        model.need_weights = was_weights
    return float(np.mean(shares)) if shares else 0.0


def mean_cross_attention(model: SegmentCrossEncoder, tokenizer, queries: list[str],
                         passages: list[str], max_length: int, batch_size: int = 50) -> float:
    """:func:`cross_attention_mass` averaged over (query, passage) pairs, in batches."""
    device = next(model.parameters()).device
    shares, weights = [], []
    for start in range(0, len(queries), batch_size):
        batch = encode_segment_pairs(tokenizer, queries[start:start + batch_size],
                                     passages[start:start + batch_size], max_length).to(device)
        shares.append(cross_attention_mass(model, dict(batch)))
        weights.append(len(batch["input_ids"]))
    return float(np.average(shares, weights=weights)) if shares else 0.0
