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
    head_count_attr: str | None  # attribute of the attention module holding its head count
    all_head_attr: str | None  # attribute holding heads * head_size (None: read off the shapes)
    cfg_heads: str
    cfg_hidden: str
    cfg_ffn: str
    cfg_layers: str
    attn_out_inside_attention: bool  # DistilBERT applies out_lin inside the attention module
    qkv_parts: int = 1  # blocks of heads stacked in each q/k/v module (3: one fused Wqkv)
    ffn_in_parts: int = 1  # blocks of neurons stacked in the FFN input (2: a gated FFN, input + gate)
    # decoder LLMs (Llama, Mistral, Qwen): SwiGLU's gate projection, pruned with ffn_in; the
    # config field of the key/value head count (grouped-query attention: a pruning unit is one
    # key/value group with its query heads); the final norm after the layer stack
    ffn_gate: str | None = None
    cfg_kv_heads: str | None = None
    final_norm: str | None = None

    @property
    def is_decoder(self) -> bool:
        return self.cfg_kv_heads is not None


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


# decoder-LLM text encoders: causal attention, rotary positions, RMSNorm (untouched by pruning)
_DECODER = dict(
    layers="layers",
    attention="self_attn",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    ffn_in="mlp.up_proj",
    ffn_out="mlp.down_proj",
    head_count_attr=None,  # the attention modules infer their head count from the tensors
    all_head_attr=None,
    cfg_heads="num_attention_heads",
    cfg_hidden="hidden_size",
    cfg_ffn="intermediate_size",
    cfg_layers="num_hidden_layers",
    attn_out_inside_attention=True,
    ffn_gate="mlp.gate_proj",
    cfg_kv_heads="num_key_value_heads",
    final_norm="norm",
)
ADAPTERS.update({family: Adapter(family=family, **_DECODER)
                 for family in ("llama", "mistral", "qwen2", "qwen3")})
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
    """(num_layers, heads, head_size, ffn) of the unpruned base config.

    For a decoder with grouped-query attention the pruning unit ("head") is one key/value group:
    ``heads`` is the key/value head count and ``head_size`` the query width of a group
    (query heads per group * head dim); its keys and values are ``head_size // kv_groups`` wide."""
    heads = getattr(config, adapter.cfg_heads)
    hidden = getattr(config, adapter.cfg_hidden)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers, ffn = getattr(config, adapter.cfg_layers), getattr(config, adapter.cfg_ffn)
    if adapter.cfg_kv_heads is None:
        return layers, heads, head_dim, ffn
    groups = kv_groups(config, adapter)
    return layers, heads // groups, head_dim * groups, ffn


def kv_groups(config, adapter: Adapter) -> int:
    """Query heads per key/value head (1 without grouped-query attention)."""
    if adapter.cfg_kv_heads is None:
        return 1
    heads = getattr(config, adapter.cfg_heads)
    kv = getattr(config, adapter.cfg_kv_heads, None) or heads
    return heads // kv


def qkv_unit_rows(adapter: Adapter, units: torch.Tensor, head_size: int, present: int,
                  groups: int = 1) -> dict[str, torch.Tensor]:
    """``{q/k/v module: its rows that belong to units}`` for ``present`` heads of ``head_size``:
    a fused projection holds ``qkv_parts`` blocks of them; with grouped-query attention
    (``groups`` query heads per key/value head, a unit being one group) keys and values are
    ``head_size // groups`` wide per unit."""
    if adapter.qkv_parts > 1:
        return {path: unit_rows(units, head_size, present, adapter.qkv_parts) for path in qkv_paths(adapter)}
    kv = unit_rows(units, head_size // groups, present, 1)
    return {adapter.query: unit_rows(units, head_size, present, 1), adapter.key: kv, adapter.value: kv}
