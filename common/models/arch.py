"""Architecture adapters: where each model family keeps the pieces that pruning touches.

BERT, RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT differ only in attribute names. An :class:`Adapter`
names the layer stack, the q/k/v/output projections, the FFN layers, the attributes that
hold head counts, and the config fields. Masks, importance scores, reshape, FLOP counts and
the analytic parameter count are written once against this adapter (``common.models.structure``).

ModernBERT is data too, with two counts: its one ``Wqkv`` projection holds three stacked blocks
of heads (``qkv_parts=3``: q, k, v; the head count is inferred from the width, so no attribute
holds it), and its gated FFN input ``Wi`` two stacked blocks of neurons (``ffn_in_parts=2``:
input and gate halves, ``chunk(2)``). :func:`unit_rows` is the one place that turns units (heads,
neurons) into the rows of such a projection; rotary positions, alternating global / local
attention and the absent token types need nothing from pruning.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    family: str
    layers: str  # the nn.ModuleList of layers, relative to model.base_model
    attention: str  # the self-attention module inside a layer (returns (context, weights))
    query: str
    key: str
    value: str
    attn_out: str  # the projection after the heads' concatenated context
    ffn_in: str
    ffn_out: str
    head_count_attr: str  # attribute of the attention module holding its head count
    all_head_attr: str  # attribute holding heads * head_size
    cfg_heads: str
    cfg_hidden: str
    cfg_ffn: str
    cfg_layers: str
    attn_out_inside_attention: bool  # DistilBERT applies out_lin inside the attention module
    qkv_parts: int = 1  # blocks of heads stacked in each q/k/v module (3: one fused Wqkv)
    ffn_in_parts: int = 1  # blocks of neurons stacked in the FFN input (2: a gated FFN, input + gate)


_BERT_LIKE = dict(
    layers="encoder.layer",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    head_count_attr="num_attention_heads",
    all_head_attr="all_head_size",
    cfg_heads="num_attention_heads",
    cfg_hidden="hidden_size",
    cfg_ffn="intermediate_size",
    cfg_layers="num_hidden_layers",
    attn_out_inside_attention=False,
)

ADAPTERS = {
    "bert": Adapter(family="bert", **_BERT_LIKE),
    "roberta": Adapter(family="roberta", **_BERT_LIKE),
    "xlm-roberta": Adapter(family="xlm-roberta", **_BERT_LIKE),  # BGE-M3, bge-reranker-*
    "electra": Adapter(family="electra", **_BERT_LIKE),
    "distilbert": Adapter(
        family="distilbert",
        layers="transformer.layer",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        attn_out="attention.out_lin",
        ffn_in="ffn.lin1",
        ffn_out="ffn.lin2",
        head_count_attr="n_heads",
        all_head_attr="dim",
        cfg_heads="n_heads",
        cfg_hidden="dim",
        cfg_ffn="hidden_dim",
        cfg_layers="n_layers",
        attn_out_inside_attention=True,
    ),
    "modernbert": Adapter(
        family="modernbert",
        layers="layers",
        attention="attn",
        query="attn.Wqkv",
        key="attn.Wqkv",
        value="attn.Wqkv",
        attn_out="attn.Wo",
        ffn_in="mlp.Wi",
        ffn_out="mlp.Wo",
        head_count_attr="",  # inferred from Wqkv's width
        all_head_attr="",
        cfg_heads="num_attention_heads",
        cfg_hidden="hidden_size",
        cfg_ffn="intermediate_size",
        cfg_layers="num_hidden_layers",
        attn_out_inside_attention=True,
        qkv_parts=3,
        ffn_in_parts=2,
    ),
}


def qkv_paths(adapter: Adapter) -> tuple[str, ...]:
    """The distinct modules holding q, k and v (one for a fused projection)."""
    return tuple(dict.fromkeys((adapter.query, adapter.key, adapter.value)))


def unit_rows(units: torch.Tensor, size: int, count: int, parts: int) -> torch.Tensor:
    """Rows of a projection made of ``parts`` stacked blocks of ``count`` units of ``size`` rows
    each (heads: size = head size; neurons: size 1) that belong to ``units`` (positions < count)."""
    units = torch.as_tensor(units, dtype=torch.long).flatten()
    rows = (units[:, None] * size + torch.arange(size)).flatten()
    return torch.cat([rows + p * count * size for p in range(parts)])


def adapter_for(config) -> Adapter:
    """The adapter of a transformers config (by ``model_type``); a clear error otherwise."""
    family = getattr(config, "model_type", None)
    if family not in ADAPTERS:
        raise ValueError(
            f"model_type {family!r} is not supported; supported families: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[family]


def get_module(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


def set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path) if parent_path else root
    setattr(parent, name, new)


def layer_stack(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    return get_module(model.base_model, adapter.layers)


def dims(config, adapter: Adapter) -> tuple[int, int, int, int]:
    """(num_layers, heads, head_size, ffn) of the unpruned base config."""
    heads = getattr(config, adapter.cfg_heads)
    hidden = getattr(config, adapter.cfg_hidden)
    return getattr(config, adapter.cfg_layers), heads, hidden // heads, getattr(config, adapter.cfg_ffn)
