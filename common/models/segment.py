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
knows it; :func:`common.kinds.loading.load_model` rebuilds it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.utils import ModelOutput

from common.models.arch import adapter_for, get_module, layer_stack
from common.models.standalone import SEGMENT_HEAD, prepare_segment_head, segment_forward, segments_from_ids

HEAD = SEGMENT_HEAD
HEADS = ("classifier", HEAD)  # classifier: the monoBERT 2-label head
SCALE_INIT = 10.0  # the recipes' --distill_scale: teacher cosines x 10
QUERY_MAX_TOKENS = 32  # the query segment, special tokens included


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
        if adapter_for(encoder.config).qkv_parts != 1:  # its attention takes rotary positions, no segments
            raise ValueError(f"the {HEAD} head is not available for {encoder.config.model_type} models; "
                             "use --head classifier or --model_kind bi")
        self.encoder = encoder
        config = encoder.config
        self.config = config
        config.slimrank_head = HEAD
        if sep_token_id is not None:
            config.slimrank_sep_token_id = int(sep_token_id)
        if getattr(config, "slimrank_sep_token_id", None) is None:
            raise ValueError("the segment head needs the tokenizer's sep_token_id")
        adapter = adapter_for(config)
        prepare_segment_head(self, encoder, layer_stack(encoder, adapter), adapter.attention,
                             getattr(config, adapter.cfg_hidden), SCALE_INIT)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def set_attn_implementation(self, name: str) -> None:
        """``eager``: return attention probabilities (head confidence asks so); anything else:
        the fused kernel when no gradient is needed (see ``common.models.standalone.segment_attention``)."""
        self.need_weights = name == "eager"

    def keep_layers(self, n: int) -> None:
        self.cross_gate = nn.Parameter(self.cross_gate.data[:n].clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, return_dict: bool = True,
                **_kwargs) -> SegmentOutput:
        score, q, p, hidden = segment_forward(self, input_ids, attention_mask)
        return SegmentOutput(logits=score, query_embeddings=q, passage_embeddings=p,
                             last_hidden_state=hidden)


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
