"""The modeling code a slimrank model directory carries with it (``modeling_slimrank.py``).

This file imports only torch and transformers, never ``common``: ``common.kinds.loading.save_model``
copies it into every model directory it writes, with an ``auto_map`` in ``config.json``, so that
stock tools open the directory without slimrank installed::

    AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)  # cross
    AutoModel.from_pretrained(dir, trust_remote_code=True)                           # bi
    sentence_transformers.CrossEncoder(dir, trust_remote_code=True)
    sentence_transformers.SentenceTransformer(dir, trust_remote_code=True)

Two things no stock config can say are written into ``config.json`` and read here:

* ``slimrank_layout``: where the family keeps its layers and projections (from
  ``common.models.arch``) and the head count and FFN width of *each* layer. The classes below build the
  stock model and then give every layer its own widths, so a pruned model's weights load as they
  are (a layer without heads keeps only the output bias of its attention block).
* ``slimrank_head: segment_cosine``: the segment-cosine cross-encoder (``common.models.segment``):
  a pair ``[CLS] q [SEP] [CLS] p [SEP]`` is one sequence whose two segments attend to each other
  through learned per-layer gates; the score is a scaled cosine of the two pooled segments plus
  a linear term on the passage's [CLS]. Its attention function, segment derivation and forward
  live here, once; ``common.models.segment`` uses them for training.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

ATTENTION = "slimrank_segment"
SEGMENT_HEAD = "segment_cosine"
# family -> (bare encoder class, sequence-classification class) in transformers
FAMILY_CLASSES = {"bert": ("BertModel", "BertForSequenceClassification"),
                  "roberta": ("RobertaModel", "RobertaForSequenceClassification"),
                  "xlm-roberta": ("XLMRobertaModel", "XLMRobertaForSequenceClassification"),
                  "electra": ("ElectraModel", "ElectraForSequenceClassification"),
                  "distilbert": ("DistilBertModel", "DistilBertForSequenceClassification"),
                  "modernbert": ("ModernBertModel", "ModernBertForSequenceClassification"),
                  # decoder-LLM text encoders (grouped-query attention, SwiGLU)
                  "llama": ("LlamaModel", "LlamaForSequenceClassification"),
                  "mistral": ("MistralModel", "MistralForSequenceClassification"),
                  "qwen2": ("Qwen2Model", "Qwen2ForSequenceClassification"),
                  "qwen3": ("Qwen3Model", "Qwen3ForSequenceClassification")}


# -- the segment-cosine head -------------------------------------------------------------------
def segment_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask, scaling: float | None = None,
                      dropout: float = 0.0, segment_ids: torch.Tensor | None = None,
                      cross_gates: torch.Tensor | None = None, segment_weights: bool = False,
                      **_kwargs):
    """Attention with gated cross-segment weights; returns (context, weights).

    ``segment_ids`` ``(B, T)``: 0 query, 1 passage, -1 padding. With gradients (training) or
    when the probabilities are asked for (``segment_weights``: head confidence, the
    cross-attention report) the softmax is computed here in float32 with multiplicative gates,
    whose gradient at 0 is finite. Otherwise (inference) the same function runs as PyTorch's
    fused ``scaled_dot_product_attention`` with the gates as an additive ``log(alpha)`` mask
    (-inf while shut): equal up to rounding, and as fast as the stock model."""
    if segment_ids is None or cross_gates is None:
        raise ValueError("segment attention needs segment_ids and cross_gates "
                         "(call the model through its segment-cosine head)")
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


def pool_segment(hidden: torch.Tensor, member: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over a segment's tokens, or (``cls``) the segment's first token."""
    mask = member.unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        first = member.float().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def prepare_segment_head(head: nn.Module, encoder: nn.Module, layers, attention_path: str,
                         hidden: int, scale_init: float) -> None:
    """Give ``head`` (the module holding ``encoder``) the head's parameters and wiring: every
    self-attention module knows its layer index and runs :func:`segment_attention`; gates start
    at 0, ``scale`` at ``scale_init``, ``cls_linear`` (bias-free) at 0."""
    config = encoder.config
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # BERT's pooler: unused here (and unused weights break DDP)
    for i, layer in enumerate(layers):
        _get(layer, attention_path).slimrank_layer = i
    encoder.set_attn_implementation(ATTENTION)
    head.cross_gate = nn.Parameter(torch.zeros(len(layers)))
    head.scale = nn.Parameter(torch.tensor(scale_init))
    # no bias: a constant shifts every pair's score alike (no ranking loss sees it, and
    # AdamW would turn its round-off gradient into full-size steps)
    head.cls_linear = nn.Linear(hidden, 1, bias=False)
    nn.init.zeros_(head.cls_linear.weight)
    # RoBERTa counts positions from padding_idx + 1
    head.position_offset = config.pad_token_id + 1 if config.model_type in ("roberta", "xlm-roberta") else 0
    head.need_weights = False


def segment_forward(head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The segment-cosine score of every pair in the batch: ``(logits (B, 1), q, p, hidden)``."""
    config = head.config
    segment, position_ids = segments_from_ids(input_ids, attention_mask, config.slimrank_sep_token_id)
    kwargs = {"token_type_ids": torch.zeros_like(input_ids)}
    if config.model_type == "distilbert":
        kwargs = {}
    hidden = head.encoder(input_ids=input_ids, position_ids=position_ids + head.position_offset,
                          segment_ids=segment, cross_gates=head.cross_gate,
                          segment_weights=head.need_weights, **kwargs).last_hidden_state
    pooling = getattr(config, "slimrank_pooling", "mean")
    q, p = (pool_segment(hidden, segment == s, pooling) for s in (0, 1))
    q, p = F.normalize(q.float(), dim=-1), F.normalize(p.float(), dim=-1)
    first_p = (segment == 1).float().argmax(dim=1)  # the passage segment's [CLS]
    cls = hidden[torch.arange(hidden.shape[0], device=hidden.device), first_p]
    score = head.scale * (q * p).sum(-1, keepdim=True) + head.cls_linear(cls).float()
    return score, q, p, hidden


# -- per-layer widths --------------------------------------------------------------------------
def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent) if parent else root, name, module)


class EmptySelfAttention(nn.Module):
    """Stands in for a self-attention block whose heads are all gone: its context has width 0.

    The attention output projection then contributes only its bias, exactly what the masked
    model computes. For DistilBERT the output projection lives inside the attention module, so
    it is carried here under its original name to keep state-dict keys stable.
    """

    def __init__(self, out_name: str | None = None, out_proj: nn.Module | None = None):
        super().__init__()
        self.out_name = out_name
        if out_name is not None:
            setattr(self, out_name, out_proj)

    def forward(self, hidden_states, *args, **kwargs):
        context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if self.out_name is not None:
            out = getattr(self, self.out_name)
            # its output is its bias (zeros without one): no empty matrix product in a traced
            # graph, which onnxruntime's int8 quantizer cannot take
            context = hidden_states.new_zeros(*hidden_states.shape[:-1], out.out_features)
            if out.bias is not None:
                context = context + out.bias.to(context.dtype)
        return context, None


def _resized(old: nn.Module, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=getattr(old, "bias", None) is not None)


def apply_layout(base_model: nn.Module, layout: dict) -> None:
    """Give each layer of a freshly built stock encoder the widths ``layout`` records (new,
    uninitialised linear layers of the right shapes: the weights are loaded afterwards).
    ``qkv_parts`` / ``ffn_in_parts``: blocks stacked in one projection (a fused Wqkv: 3, a gated
    FFN input: 2; ``common.models.arch``). A decoder's unit is one key/value group (``kv_groups``
    query heads): keys and values are ``head_size // kv_groups`` wide per unit; its SwiGLU gate
    (``ffn_gate``) is as wide as the FFN."""
    d = layout["head_size"]
    qkv_parts, ffn_parts = layout.get("qkv_parts", 1), layout.get("ffn_in_parts", 1)
    groups = layout.get("kv_groups", 1)
    for layer, heads, ffn in zip(_get(base_model, layout["layers"]), layout["heads_per_layer"],
                                 layout["ffn_per_layer"]):
        width = heads * d
        widths = {layout["query"]: width, layout["key"]: width // groups, layout["value"]: width // groups}
        for path in dict.fromkeys((layout["query"], layout["key"], layout["value"])):
            old = _get(layer, path)  # a fused projection holds qkv_parts blocks of the heads
            _set(layer, path, _resized(old, old.in_features, qkv_parts * width if qkv_parts > 1 else widths[path]))
        out = _get(layer, layout["attn_out"])
        _set(layer, layout["attn_out"], _resized(out, width, out.out_features))
        inner = _get(layer, layout["ffn_in"])
        _set(layer, layout["ffn_in"], _resized(inner, inner.in_features, ffn_parts * ffn))
        if layout.get("ffn_gate"):
            gate = _get(layer, layout["ffn_gate"])
            _set(layer, layout["ffn_gate"], _resized(gate, gate.in_features, ffn))
        outer = _get(layer, layout["ffn_out"])
        _set(layer, layout["ffn_out"], _resized(outer, ffn, outer.out_features))
        attention = _get(layer, layout["attention"])
        if heads == 0:
            name = layout["attn_out"].rpartition(".")[2] if layout["attn_out_inside_attention"] else None
            _set(layer, layout["attention"],
                 EmptySelfAttention(name, getattr(attention, name) if name else None))
        elif layout["head_count_attr"]:  # (ModernBERT infers its head count from Wqkv)
            setattr(attention, layout["head_count_attr"], heads)
            setattr(attention, layout["all_head_attr"], width)


# transformers guesses from a module's source whether its classes may switch attention
# implementation, and this module's EmptySelfAttention misleads the guess: say it outright
_ATTENTION_SETTABLE = {"_can_set_attn_implementation_cached_value": True}


def _with_layout(base: type) -> type:
    """``base`` (a transformers model class) whose layers take their widths from the config."""
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        if getattr(config, "slimrank_layout", None):
            apply_layout(self.base_model, config.slimrank_layout)

    return type(f"Slimrank{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__,
                                                      **_ATTENTION_SETTABLE})


class _SegmentRanker(PreTrainedModel):
    """The segment-cosine cross-encoder as a transformers model (``logits``: (B, 1) scores)."""

    base_model_prefix = "encoder"
    encoder_class: type = None  # set per family below

    def __init__(self, config):
        super().__init__(config)
        layout = config.slimrank_layout
        pooler = "add_pooling_layer" in inspect.signature(self.encoder_class.__mro__[1].__init__).parameters
        encoder = self.encoder_class(config, **({"add_pooling_layer": False} if pooler else {}))
        self.encoder = encoder
        prepare_segment_head(self, encoder, _get(encoder, layout["layers"]), layout["attention"],
                             layout["hidden"], 0.0)  # scale: loaded with the weights
        self.post_init()

    def _init_weights(self, module):
        if module is self:
            return
        self.encoder._init_weights(module)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, return_dict: bool = True, **_kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        score, *_ = segment_forward(self, input_ids, attention_mask)
        return SequenceClassifierOutput(logits=score)


def _segment_ranker(family: str, encoder_class: type) -> type:
    config_class = encoder_class.config_class
    return type(f"Slimrank{config_class.__name__.removesuffix('Config')}SegmentRanker", (_SegmentRanker,),
                {"encoder_class": encoder_class, "config_class": config_class, "__module__": __name__,
                 **_ATTENTION_SETTABLE})


CLASSES = {}  # (family, role) -> class; role: encoder | classifier | segment
for _family, (_encoder, _classifier) in FAMILY_CLASSES.items():
    _encoder_cls = _with_layout(getattr(transformers, _encoder))
    CLASSES[_family, "encoder"] = _encoder_cls
    CLASSES[_family, "classifier"] = _with_layout(getattr(transformers, _classifier))
    CLASSES[_family, "segment"] = _segment_ranker(_family, _encoder_cls)
for _cls in CLASSES.values():
    globals()[_cls.__name__] = _cls
