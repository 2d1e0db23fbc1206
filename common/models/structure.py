"""Structured pruning surgery: masks in the forward pass, physical reshape, ``pruning.json``.

One :class:`PruningState` describes a model's structure against its *base* config: for each
layer, the original indices of the heads and FFN neurons that are physically present in the
tensors (all of them before reshape) and of those still alive (not masked). Everything here is
written once against :class:`common.models.arch.Adapter`, never per family.

Masking keeps three things consistent, so that a masked model computes exactly what the
reshaped one will and dead units never come back:
  * forward pre-hooks multiply the input of the attention output projection by the head mask
    (a head's context is zeroed) and the input of the FFN output projection by the neuron mask;
  * the dead units' weights (q/k/v rows and biases, output-projection columns, FFN input rows
    and biases, FFN output columns) are set to zero;
  * their optimizer state (AdamW's moments) is zeroed, so with zero gradients and zero weights
    AdamW leaves them at exactly zero, weight decay included.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import prune_linear_layer

from common.layout import PRUNING_FILE, structure_tag
from common.models.arch import (Adapter, adapter_for, dims, get_module, kv_groups, layer_stack, qkv_unit_rows,
                                set_module, unit_rows)
from common.models.standalone import EmptySelfAttention  # one definition: model dirs carry it too

PRUNING_FORMAT = "slimrank-pruning/1"


@dataclass
class PruningState:
    family: str
    num_heads: int  # per layer, in the base config
    head_size: int
    ffn_size: int  # per layer, in the base config
    present_heads: list[list[int]]  # original indices physically present in the tensors
    present_ffn: list[list[int]]
    kept_heads: list[list[int]]  # original indices alive (a subset of present)
    kept_ffn: list[list[int]]
    history: list[dict] = field(default_factory=list)

    @classmethod
    def full(cls, config) -> "PruningState":
        adapter = adapter_for(config)
        layers, heads, head_size, ffn = dims(config, adapter)
        all_heads = [list(range(heads)) for _ in range(layers)]
        all_ffn = [list(range(ffn)) for _ in range(layers)]
        return cls(adapter.family, heads, head_size, ffn, all_heads, [list(r) for r in all_ffn],
                   [list(h) for h in all_heads], [list(r) for r in all_ffn])

    # -- summaries -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.kept_heads)

    @property
    def heads_per_layer(self) -> list[int]:
        return [len(k) for k in self.kept_heads]

    @property
    def ffn_per_layer(self) -> list[int]:
        return [len(k) for k in self.kept_ffn]

    @property
    def total_heads(self) -> int:
        return sum(self.heads_per_layer)

    @property
    def total_ffn(self) -> int:
        return sum(self.ffn_per_layer)

    @property
    def is_reshaped(self) -> bool:
        return self.present_heads == self.kept_heads and self.present_ffn == self.kept_ffn

    def head_alive(self, layer: int) -> torch.Tensor:
        """Bool mask over the physically present heads of ``layer``."""
        kept = set(self.kept_heads[layer])
        return torch.tensor([h in kept for h in self.present_heads[layer]], dtype=torch.bool)

    def ffn_alive(self, layer: int) -> torch.Tensor:
        kept = set(self.kept_ffn[layer])
        return torch.tensor([n in kept for n in self.present_ffn[layer]], dtype=torch.bool)

    def tag(self) -> str:
        return structure_tag(self.total_heads, self.total_ffn)

    # -- persistence -----------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": PRUNING_FORMAT, "reshaped": self.is_reshaped,
                "heads_per_layer": self.heads_per_layer, "ffn_per_layer": self.ffn_per_layer,
                **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, source: str = PRUNING_FILE) -> "PruningState":
        if data.get("format") != PRUNING_FORMAT:
            raise ValueError(f"{source}: field 'format' is {data.get('format')!r}, "
                             f"expected {PRUNING_FORMAT!r}")
        names = [f for f in cls.__dataclass_fields__]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        state = cls(**{n: data[n] for n in names})
        for layer in range(state.num_layers):
            if not set(state.kept_heads[layer]) <= set(state.present_heads[layer]):
                raise ValueError(f"{source}: layer {layer}: kept_heads not within present_heads")
            if not set(state.kept_ffn[layer]) <= set(state.present_ffn[layer]):
                raise ValueError(f"{source}: layer {layer}: kept_ffn not within present_ffn")
        return state

    def save(self, directory: str | Path) -> None:
        Path(directory, PRUNING_FILE).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> "PruningState":
        path = Path(directory, PRUNING_FILE)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a pruning state (a JSON object with 'format')")
        return cls.from_json(data, str(path))


# -- masks in the forward pass ----------------------------------------------------------------
class Masks:
    """Forward pre-hooks that zero dead heads' context and dead neurons' activations."""

    def __init__(self, model: nn.Module, state: PruningState):
        self.model, self.state = model, state
        self.adapter = adapter_for(model.config)
        self._head_masks: list[torch.Tensor | None] = []
        self._ffn_masks: list[torch.Tensor | None] = []
        self._handles = []
        for i, layer in enumerate(layer_stack(model, self.adapter)):
            self._handles.append(get_module(layer, self.adapter.attn_out)
                                 .register_forward_pre_hook(self._hook(self._head_masks, i)))
            self._handles.append(get_module(layer, self.adapter.ffn_out)
                                 .register_forward_pre_hook(self._hook(self._ffn_masks, i)))
        self.refresh()

    @staticmethod
    def _hook(masks: list, index: int):
        def hook(_module, args):
            mask = masks[index]
            if mask is None:
                return None
            return (args[0] * mask.to(device=args[0].device, dtype=args[0].dtype),) + args[1:]
        return hook

    def refresh(self) -> None:
        """Rebuild the mask tensors from the state (after a prune event)."""
        s = self.state
        self._head_masks[:] = [None if bool(s.head_alive(i).all())
                               else s.head_alive(i).float().repeat_interleave(s.head_size)
                               for i in range(s.num_layers)]
        self._ffn_masks[:] = [None if bool(s.ffn_alive(i).all()) else s.ffn_alive(i).float()
                              for i in range(s.num_layers)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _dead_slices(state: PruningState, adapter: Adapter, layer: int, groups: int = 1):
    """(module path, parameter name, dim, dead indices) for every weight a dead unit owns.

    With grouped-query attention (``groups`` query heads per key/value head) a unit is a whole
    group: ``head_size`` query rows and output columns, ``head_size // groups`` key and value
    rows. A gated FFN (SwiGLU) neuron owns a gate row as well as an input row."""
    dead_h = torch.nonzero(~state.head_alive(layer)).flatten()
    heads, ffn = len(state.present_heads[layer]), len(state.present_ffn[layer])
    rows = unit_rows(dead_h, state.head_size, heads, 1)
    qkv = qkv_unit_rows(adapter, dead_h, state.head_size, heads, groups)
    dead_f = torch.nonzero(~state.ffn_alive(layer)).flatten()
    ffn_rows = unit_rows(dead_f, 1, ffn, adapter.ffn_in_parts)
    out = []
    for path, index in qkv.items():
        out += [(path, "weight", 0, index), (path, "bias", 0, index)]
    out.append((adapter.attn_out, "weight", 1, rows))
    out += [(adapter.ffn_in, "weight", 0, ffn_rows), (adapter.ffn_in, "bias", 0, ffn_rows)]
    if adapter.ffn_gate:
        out += [(adapter.ffn_gate, "weight", 0, dead_f), (adapter.ffn_gate, "bias", 0, dead_f)]
    out.append((adapter.ffn_out, "weight", 1, dead_f))
    return out


@torch.no_grad()
def zero_dead_weights(model: nn.Module, state: PruningState,
                      optimizer: torch.optim.Optimizer | None = None) -> None:
    """Zero the dead units' weights and their optimizer state (see the module docstring)."""
    adapter = adapter_for(model.config)
    groups = kv_groups(model.config, adapter)
    for i, layer in enumerate(layer_stack(model, adapter)):
        for path, name, dim, index in _dead_slices(state, adapter, i, groups):
            if len(index) == 0:
                continue
            param = getattr(get_module(layer, path), name)
            if param is None:
                continue
            param.index_fill_(dim, index.to(param.device), 0.0)
            if optimizer is not None:
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.index_fill_(dim, index.to(value.device), 0.0)


# -- physical reshape ---------------------------------------------------------------------------
def _shrink(model: nn.Module, heads_idx: list[torch.Tensor], ffn_idx: list[torch.Tensor],
            head_size: int) -> None:
    """Slice every layer to the given (physical) head and neuron positions."""
    adapter = adapter_for(model.config)
    groups = kv_groups(model.config, adapter)
    for i, layer in enumerate(layer_stack(model, adapter)):
        rows = unit_rows(heads_idx[i], head_size, 0, 1)
        attention = get_module(layer, adapter.attention)
        # an attention block emptied by an earlier reshape has no projections left to slice
        # (reshaping a reshaped dir again, e.g. 04 --onnx on a shipped model)
        emptied = isinstance(attention, EmptySelfAttention)
        if not emptied:  # q/k/v rows (a fused Wqkv holds qkv_parts blocks of the present heads)
            present = get_module(layer, adapter.attn_out).in_features // head_size
            for path, index in qkv_unit_rows(adapter, heads_idx[i], head_size, present, groups).items():
                set_module(layer, path, prune_linear_layer(get_module(layer, path), index, dim=0))
        if not (emptied and adapter.attn_out_inside_attention):
            set_module(layer, adapter.attn_out,
                       prune_linear_layer(get_module(layer, adapter.attn_out), rows, dim=1))
        if len(heads_idx[i]) == 0 and not isinstance(attention, EmptySelfAttention):
            if adapter.attn_out_inside_attention:
                out_name = adapter.attn_out.rpartition(".")[2]
                replacement = EmptySelfAttention(out_name, getattr(attention, out_name))
            else:
                replacement = EmptySelfAttention()
            set_module(layer, adapter.attention, replacement)
        elif not isinstance(attention, EmptySelfAttention) and adapter.head_count_attr:
            setattr(attention, adapter.head_count_attr, len(heads_idx[i]))
            setattr(attention, adapter.all_head_attr, len(heads_idx[i]) * head_size)
        width = get_module(layer, adapter.ffn_out).in_features
        set_module(layer, adapter.ffn_in, prune_linear_layer(
            get_module(layer, adapter.ffn_in), unit_rows(ffn_idx[i], 1, width, adapter.ffn_in_parts), dim=0))
        if adapter.ffn_gate:
            set_module(layer, adapter.ffn_gate,
                       prune_linear_layer(get_module(layer, adapter.ffn_gate), ffn_idx[i], dim=0))
        set_module(layer, adapter.ffn_out,
                   prune_linear_layer(get_module(layer, adapter.ffn_out), ffn_idx[i], dim=1))


def reshape(model: nn.Module, state: PruningState) -> PruningState:
    """Physically remove dead heads and neurons; returns the new (reshaped) state.

    Remove any :class:`Masks` hooks first: after reshape nothing is masked.
    """
    heads_idx = [torch.nonzero(state.head_alive(i)).flatten() for i in range(state.num_layers)]
    ffn_idx = [torch.nonzero(state.ffn_alive(i)).flatten() for i in range(state.num_layers)]
    _shrink(model, heads_idx, ffn_idx, state.head_size)
    new = PruningState(**{**asdict(state),
                          "present_heads": [list(k) for k in state.kept_heads],
                          "present_ffn": [list(k) for k in state.kept_ffn]})
    return new


def restructure_for_loading(model: nn.Module, state: PruningState) -> None:
    """Give a freshly built base model the physical shapes recorded in ``state``."""
    heads_idx = [torch.arange(len(p)) for p in state.present_heads]
    ffn_idx = [torch.arange(len(p)) for p in state.present_ffn]
    if any(len(p) != state.num_heads for p in state.present_heads) or any(
            len(p) != state.ffn_size for p in state.present_ffn):
        _shrink(model, heads_idx, ffn_idx, state.head_size)


def analytic_param_count(state: PruningState, hidden: int, unpruned_params: int,
                         groups: int = 1, qkv_bias: bool = True, ffn_matrices: int = 2,
                         ffn_bias: bool = True, attention_rest: int = 0) -> int:
    """Parameters of the reshaped model from ``pruning.json`` alone.

    A head owns head_size rows (weight and bias) of each of q, k and v and head_size columns
    of the output projection: 4*h*d + 3*d parameters. An FFN neuron owns one row and bias of
    the input projection and one column of the output projection: 2*h + 1.

    Decoders (grouped-query attention, ``groups`` query heads per key/value head; a unit is one
    group, d = its query width): 2*h*d + 2*h*d/groups, plus d + 2*d/groups with q/k/v biases
    (Qwen2); a SwiGLU neuron (``ffn_matrices`` = 3, no biases) owns 3*h. ``attention_rest``:
    what an attention block holds besides its heads (Qwen3's query/key norms, 2 * head_dim),
    gone from a layer left without heads.
    """
    removed_heads = state.num_heads * state.num_layers - state.total_heads
    removed_ffn = state.ffn_size * state.num_layers - state.total_ffn
    d, kv = state.head_size, state.head_size // groups
    per_head = 2 * hidden * d + 2 * hidden * kv + ((d + 2 * kv) if qkv_bias else 0)
    per_neuron = ffn_matrices * hidden + (1 if ffn_bias else 0)
    emptied = sum(1 for heads in state.kept_heads if not heads)
    return unpruned_params - removed_heads * per_head - removed_ffn * per_neuron - emptied * attention_rest


def standalone_layout(state: PruningState, adapter: Adapter, hidden: int, groups: int = 1) -> dict:
    """What ``common.models.standalone`` needs to rebuild the physical shapes without slimrank: where
    the family keeps its modules, and the head count and FFN width present in each layer."""
    return {"layers": adapter.layers, "attention": adapter.attention, "query": adapter.query,
            "key": adapter.key, "value": adapter.value, "attn_out": adapter.attn_out,
            "ffn_in": adapter.ffn_in, "ffn_out": adapter.ffn_out, "ffn_gate": adapter.ffn_gate,
            "head_count_attr": adapter.head_count_attr, "all_head_attr": adapter.all_head_attr,
            "attn_out_inside_attention": adapter.attn_out_inside_attention,
            "qkv_parts": adapter.qkv_parts, "ffn_in_parts": adapter.ffn_in_parts,
            "hidden": hidden, "head_size": state.head_size, "kv_groups": groups,
            "heads_per_layer": [len(h) for h in state.present_heads],
            "ffn_per_layer": [len(f) for f in state.present_ffn]}
