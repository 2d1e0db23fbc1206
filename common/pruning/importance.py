"""Importance scorers (one interface, looked up by name) and the rules that pick what to prune.

A scorer (:class:`Importance`) is made for a model's :class:`PruningState`; it says which
units it needs data for (``head_data`` / ``ffn_data``: then the pruning callback hands it the
training batches of each cycle's scoring window through ``observe``), returns per-(layer,
original index) scores with ``head_scores(model)`` / ``ffn_scores(model)`` (lowest go first),
and names the keys its scores get in the pruning history. ``@register_importance("name")``
makes it a choice of ``--importance``: a new criterion is one class in any file.

* ``confidence`` (the reference study's criteria; ``reference`` is its old name): head
  confidence after Voita et al. 2019 - for each head, the mean over non-padding query tokens
  of the maximum attention weight over keys (padding keys get zero weight), averaged over the
  pairs seen in the scoring window; attention probabilities exist only with eager attention,
  so the model switches to eager for the scoring passes and back. FFN neurons by the L1 norm
  of their input row plus |bias| in the FFN input projection.
* ``activation``: both from data - a head by the mean norm of what it writes into the residual
  stream (its context slice times its columns of the attention output projection), a neuron by
  its mean |activation| times the norm of its column of the FFN output projection, both over
  the non-padding tokens of the scoring window (compared with ``confidence`` by
  ``bench/importance_probe.py``).
* ``l1``: no data - a head by the L1 norm of its query/key/value rows (+|bias|) and its
  columns of the attention output projection; neurons as ``confidence``.
"""
from __future__ import annotations


import torch
from torch import nn

from common.models.arch import adapter_for, get_module, layer_stack, qkv_paths
from common.registry import registrar
from common.models.structure import PruningState

IMPORTANCES: dict[str, type["Importance"]] = {}
ALIASES = {"reference": "confidence"}  # the flag value before scorers had names


# class decorator: the scorer becomes available as ``get_importance(name, state)``
register_importance = registrar(IMPORTANCES, "an importance")


def importance_names() -> list[str]:
    """The accepted ``--importance`` values: registered names and their aliases."""
    return [*IMPORTANCES, *ALIASES]


def get_importance(name: str, state: PruningState) -> "Importance":
    name = ALIASES.get(name, name)
    if name not in IMPORTANCES:
        raise ValueError(f"unknown importance {name!r}; one of {', '.join(importance_names())}")
    return IMPORTANCES[name](state)


class Importance:
    """A pruning criterion. Accumulating scorers override ``observe`` and the state methods
    (``reset``, ``flat``/``load_flat`` for DDP's all-reduce, ``state_dict``/``load_state_dict``
    for exact resume); a scorer that needs no data only overrides the two score methods."""

    name: str = ""
    head_data = False  # True: head_scores need the observed batches of the scoring window
    ffn_data = False  # the same for ffn_scores
    head_key = "score"  # each pruned head's score is logged under this key
    ffn_key = "score"  # each pruned neuron's score list is logged under this key
    count_key: str | None = None  # how much data the head scores saw ("scored_pairs", ...)

    def __init__(self, state: PruningState):
        self.state = state

    def needs_data(self, heads: bool, ffn: bool) -> bool:
        """Whether an event pruning heads and/or neurons needs ``observe`` calls first."""
        return bool((heads and self.head_data) or (ffn and self.ffn_data))

    def observe(self, model: nn.Module, batch: dict) -> None: ...

    def head_scores(self, model: nn.Module | None = None) -> list[list[float]]:
        raise NotImplementedError(f"{type(self).__name__} does not score heads")

    def ffn_scores(self, model: nn.Module | None = None) -> list[list[float]]:
        raise NotImplementedError(f"{type(self).__name__} does not score FFN neurons")

    def observed(self) -> int:
        """The amount of data behind the scores (logged under ``count_key``)."""
        return 0

    def reset(self) -> None: ...

    def flat(self) -> list[float]:
        return []

    def load_flat(self, values: list[float]) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, data: dict) -> None: ...


def _scoring_pass(model: nn.Module, batch: dict, handles: list, attn_implementation: str | None = None) -> None:
    """One eval-mode forward pass over ``batch`` with the hooks behind ``handles`` attached;
    afterwards the hooks are removed and the model's mode (and attention implementation,
    when one is forced for the pass) restored. Callers run it under ``torch.no_grad``."""
    previous = model.config._attn_implementation
    was_training = model.training
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    model.eval()
    # bf16 frozen weights beside fp32 ones (a LoRA stage in bf16): the pass runs under bf16
    # autocast, as the training forward does
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    device = next(model.parameters()).device
    try:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        if attn_implementation:
            model.set_attn_implementation(previous)
        model.train(was_training)


def _add_by_original(row: list[float], present: list[int], values: list[float]) -> None:
    """Add per-position ``values`` into ``row`` at the original indices ``present``."""
    for position, original in enumerate(present):
        row[original] += values[position]


@register_importance("confidence")
class HeadConfidence(Importance):
    """Accumulates per-head confidence over scoring forward passes (eval mode, no grad);
    FFN neurons by L1 norm (``ffn_l1_scores``)."""

    head_data = True
    head_key, ffn_key, count_key = "confidence", "l1", "scored_pairs"

    def __init__(self, state: PruningState):
        super().__init__(state)
        self.sums = [[0.0] * state.num_heads for _ in range(state.num_layers)]
        self.pairs = 0

    @torch.no_grad()
    def observe(self, model: nn.Module, batch: dict) -> None:
        """One no-grad eager forward pass over ``batch``; adds each pair's confidence."""
        adapter = adapter_for(model.config)
        mask = batch["attention_mask"].bool()
        captured: dict[int, torch.Tensor] = {}
        handles = []
        for i, layer in enumerate(layer_stack(model, adapter)):
            if not self.state.present_heads[i]:
                continue

            def hook(_module, _args, output, i=i):
                captured[i] = output[1]
            handles.append(get_module(layer, adapter.attention).register_forward_hook(hook))
        _scoring_pass(model, batch, handles, attn_implementation="eager")
        query_tokens = mask.sum(dim=1).clamp(min=1).float()  # (B,)
        for i, probs in captured.items():  # probs: (B, heads present, T, T)
            top = probs.float().max(dim=-1).values  # (B, H, T): max over keys
            per_pair = (top * mask[:, None, :]).sum(dim=-1) / query_tokens[:, None]  # (B, H)
            units = len(self.state.present_heads[i])
            if per_pair.shape[1] != units:  # grouped-query attention: a unit's query heads, averaged
                per_pair = per_pair.view(per_pair.shape[0], units, -1).mean(dim=-1)
            totals = per_pair.sum(dim=0).tolist()
            _add_by_original(self.sums[i], self.state.present_heads[i], totals)
        self.pairs += int(mask.shape[0])

    def scores(self) -> list[list[float]]:
        """Mean confidence per (layer, original head); NaN where nothing was observed."""
        if self.pairs == 0:
            return [[float("nan")] * self.state.num_heads for _ in range(self.state.num_layers)]
        return [[s / self.pairs for s in layer] for layer in self.sums]

    def reset(self) -> None:
        self.sums = [[0.0] * self.state.num_heads for _ in range(self.state.num_layers)]
        self.pairs = 0

    def head_scores(self, model: nn.Module | None = None) -> list[list[float]]:
        return self.scores()

    def ffn_scores(self, model: nn.Module | None = None) -> list[list[float]]:
        return ffn_l1_scores(model, self.state)

    def observed(self) -> int:
        return self.pairs

    def flat(self) -> list[float]:
        """Sums and count as one list (what DDP ranks all-reduce)."""
        return [x for row in self.sums for x in row] + [float(self.pairs)]

    def load_flat(self, values: list[float]) -> None:
        n = self.state.num_heads
        self.sums = [list(map(float, values[i * n:(i + 1) * n])) for i in range(self.state.num_layers)]
        self.pairs = int(values[-1])

    def state_dict(self) -> dict:
        return {"sums": self.sums, "pairs": self.pairs}

    def load_state_dict(self, data: dict) -> None:
        self.sums, self.pairs = [list(map(float, r)) for r in data["sums"]], int(data["pairs"])


@register_importance("activation")
class ActivationImportance(Importance):
    """Accumulates data-driven head and neuron scores over scoring forward passes (eval mode,
    no grad): per head, the norm of its contribution to the attention output projection; per
    neuron, |activation| times the norm of its output column; summed over non-padding tokens."""

    head_data = ffn_data = True
    head_key, ffn_key, count_key = "output_norm", "activation", "scored_tokens"

    def __init__(self, state: PruningState):
        super().__init__(state)
        self.reset()

    def reset(self) -> None:
        s = self.state
        self.head_sums = [[0.0] * s.num_heads for _ in range(s.num_layers)]
        self.ffn_sums = [[0.0] * s.ffn_size for _ in range(s.num_layers)]
        self.tokens = 0

    @torch.no_grad()
    def observe(self, model: nn.Module, batch: dict) -> None:
        adapter = adapter_for(model.config)
        mask = batch["attention_mask"].bool()
        state, hooks = self.state, []
        head_size = state.head_size

        def head_hook(i, linear):
            def hook(_module, args):
                x = args[0].float()  # (B, T, heads present * head_size)
                present = x.shape[-1] // head_size
                w = linear.weight.float().view(linear.weight.shape[0], present, head_size)
                out = torch.einsum("bthd,ohd->btho", x.view(*x.shape[:2], present, head_size), w)
                norms = (out.norm(dim=-1) * mask[..., None]).sum(dim=(0, 1)).tolist()
                _add_by_original(self.head_sums[i], state.present_heads[i], norms)
            return hook

        def ffn_hook(i, linear):
            def hook(_module, args):
                a = (args[0].float().abs() * mask[..., None]).sum(dim=(0, 1))
                score = (a * linear.weight.float().norm(dim=0)).tolist()
                _add_by_original(self.ffn_sums[i], state.present_ffn[i], score)
            return hook

        for i, layer in enumerate(layer_stack(model, adapter)):
            if state.present_heads[i]:
                out = get_module(layer, adapter.attn_out)
                hooks.append(out.register_forward_pre_hook(head_hook(i, out)))
            if state.present_ffn[i]:
                out = get_module(layer, adapter.ffn_out)
                hooks.append(out.register_forward_pre_hook(ffn_hook(i, out)))
        _scoring_pass(model, batch, hooks)
        self.tokens += int(mask.sum())

    def head_scores(self, model: nn.Module | None = None) -> list[list[float]]:
        return self._mean(self.head_sums)

    def ffn_scores(self, model: nn.Module | None = None) -> list[list[float]]:
        return self._mean(self.ffn_sums)

    def observed(self) -> int:
        return self.tokens

    def _mean(self, sums: list[list[float]]) -> list[list[float]]:
        if self.tokens == 0:
            return [[float("nan")] * len(row) for row in sums]
        return [[x / self.tokens for x in row] for row in sums]

    def flat(self) -> list[float]:
        return [x for row in self.head_sums + self.ffn_sums for x in row] + [float(self.tokens)]

    def load_flat(self, values: list[float]) -> None:
        s, k = self.state, 0
        rows = []
        for width in [s.num_heads] * s.num_layers + [s.ffn_size] * s.num_layers:
            rows.append([float(x) for x in values[k:k + width]])
            k += width
        self.head_sums, self.ffn_sums = rows[:s.num_layers], rows[s.num_layers:]
        self.tokens = int(values[-1])

    def state_dict(self) -> dict:
        return {"flat": self.flat()}

    def load_state_dict(self, data: dict) -> None:
        self.load_flat(data["flat"])


@torch.no_grad()
def ffn_l1_scores(model: nn.Module, state: PruningState) -> list[list[float]]:
    """L1 norm of each neuron's input row (+|bias|), per (layer, original neuron index)."""
    adapter = adapter_for(model.config)
    out = []
    for i, layer in enumerate(layer_stack(model, adapter)):
        norms = 0
        for path in (adapter.ffn_in, adapter.ffn_gate):  # a SwiGLU neuron: its up and gate rows
            if path:
                linear = get_module(layer, path)
                part = linear.weight.abs().sum(dim=1)
                if linear.bias is not None:
                    part = part + linear.bias.abs()
                norms = norms + part.view(adapter.ffn_in_parts, -1).sum(dim=0)  # a gated Wi: input + gate
        scores = [float("nan")] * state.ffn_size
        for position, original in enumerate(state.present_ffn[i]):
            scores[original] = float(norms[position])
        out.append(scores)
    return out


@torch.no_grad()
def head_l1_scores(model: nn.Module, state: PruningState) -> list[list[float]]:
    """Per (layer, original head): L1 norm of the head's query, key and value rows (+|bias|)
    and of its columns of the attention output projection (a decoder's unit: a key/value group,
    whose key and value rows are fewer than its query rows)."""
    adapter = adapter_for(model.config)
    out = []
    for i, layer in enumerate(layer_stack(model, adapter)):
        units = len(state.present_heads[i])
        total = torch.zeros(units)
        if units == 0:
            out.append([float("nan")] * state.num_heads)
            continue
        for name in qkv_paths(adapter):
            linear = get_module(layer, name)
            rows = linear.weight.abs().sum(dim=1)
            if linear.bias is not None:
                rows = rows + linear.bias.abs()
            total += rows.view(adapter.qkv_parts, units, -1).sum(dim=(0, 2)).float().cpu()
        columns = get_module(layer, adapter.attn_out).weight.abs().sum(dim=0)
        total += columns.view(units, -1).sum(dim=1).float().cpu()
        scores = [float("nan")] * state.num_heads
        for position, original in enumerate(state.present_heads[i]):
            scores[original] = float(total[position])
        out.append(scores)
    return out


@register_importance("l1")
class L1Importance(Importance):
    """Weight magnitudes only: heads by ``head_l1_scores``, neurons by ``ffn_l1_scores``."""

    head_key = ffn_key = "l1"

    def head_scores(self, model: nn.Module | None = None) -> list[list[float]]:
        return head_l1_scores(model, self.state)

    def ffn_scores(self, model: nn.Module | None = None) -> list[list[float]]:
        return ffn_l1_scores(model, self.state)


def select_heads(scores: list[list[float]], state: PruningState, count: int,
                 exclude_layers: set[int] = frozenset({0}),
                 allow_empty_layers: bool = False) -> list[tuple[int, int]]:
    """The ``count`` lowest-scoring live heads, as (layer, original head) pairs.

    Only live heads are candidates, so already-pruned heads and ties can never stall the
    selection; ties are broken by (layer, head). A layer keeps its last head unless
    ``allow_empty_layers``.
    """
    live = {i: len(state.kept_heads[i]) for i in range(state.num_layers)}
    candidates = sorted((scores[i][h], i, h) for i in range(state.num_layers)
                        if i not in exclude_layers for h in state.kept_heads[i])
    chosen = []
    for _score, layer, head in candidates:
        if len(chosen) == count:
            break
        if live[layer] <= 1 and not allow_empty_layers:
            continue
        chosen.append((layer, head))
        live[layer] -= 1
    return chosen


def select_ffn(scores: list[list[float]], state: PruningState, per_layer: int,
               scope: str = "layer", exclude_layers: set[int] = frozenset({0}),
               allow_empty_layers: bool = False) -> dict[int, list[int]]:
    """Lowest-L1 live neurons: ``per_layer`` from each prunable layer (scope 'layer'), or
    ``per_layer x #prunable layers`` chosen across layers (scope 'global'). A layer keeps at
    least one neuron unless ``allow_empty_layers``."""
    layers = [i for i in range(state.num_layers) if i not in exclude_layers]
    floor = 0 if allow_empty_layers else 1
    chosen: dict[int, list[int]] = {}
    if scope == "layer":
        for i in layers:
            ranked = sorted((scores[i][n], n) for n in state.kept_ffn[i])
            take = min(per_layer, max(0, len(ranked) - floor))
            if take:
                chosen[i] = sorted(n for _s, n in ranked[:take])
    elif scope == "global":
        budget = per_layer * len(layers)
        live = {i: len(state.kept_ffn[i]) for i in layers}
        ranked = sorted((scores[i][n], i, n) for i in layers for n in state.kept_ffn[i])
        for _s, i, n in ranked:
            if budget == 0:
                break
            if live[i] <= floor:
                continue
            chosen.setdefault(i, []).append(n)
            live[i] -= 1
            budget -= 1
        chosen = {i: sorted(v) for i, v in chosen.items()}
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return chosen


def select_per_layer(scores: list[list[float]], kept: list[list[int]], amounts: dict[int, int]) -> dict[int, list[int]]:
    """The ``amounts[layer]`` lowest-scoring live units (heads or neurons, original indices) of
    each layer, ties broken by index; layers with nothing to remove are left out."""
    chosen = {}
    for layer, amount in amounts.items():
        if amount > 0:
            ranked = sorted((scores[layer][u], u) for u in kept[layer])
            chosen[layer] = sorted(u for _s, u in ranked[:amount])
    return chosen
