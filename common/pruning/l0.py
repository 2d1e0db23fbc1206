"""Learned structured pruning to a target (03d): hard-concrete L0 gates and a Lagrangian.

Gates (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
Regularization"; as CoFi uses them for transformers, Xia et al. 2022). Every prunable unit
has a log-alpha: each attention head, each FFN neuron, and per layer the whole attention
block and the whole FFN block (a layer whose two block gates close vanishes). A training step
draws one gate vector from the stretched hard-concrete distribution::

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)        beta = 2/3, (gamma, zeta) = (-0.1, 1.1)

so a gate is exactly 0 or 1 with positive probability, and ``P(z != 0) =
sigmoid(log_alpha - beta * log(-gamma / zeta))``. In eval mode the gate is deterministic,
``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``. The gates multiply the same
activations the masks of ``common.models.structure`` zero (the input of the attention output
projection, head by head; the input of the FFN output projection, neuron by neuron), so a
closed gate is exactly a pruned unit and ``04_reshape.py`` needs nothing new.

Cost. The expected number of live heads of layer l is ``P(attention block l) * sum_h P(head)``
(the gates are independent), of FFN neurons likewise; the analytic multiply-add count of
``common.evaluation.cost.analytic_macs`` is linear in both, so the expected cost of a sequence of
``max_length`` tokens is that formula at the expected counts (a test checks it against the
Monte Carlo mean of the sampled masks' costs). The target is a cost
(``--target_macs_ratio``: expected MACs / the unpruned model's), a predicted serving time
(``--target_latency_ratio`` with ``--latency_table FILE`` of ``bench/latency_table.py``: the
table's time as a cost linear in heads and neurons, ``common.evaluation.latency.linear_costs``,
at ``--max_length``, so the expectation stays exact; the final shape's bilinear prediction is
recorded beside it) or a shape (``--target_heads`` in total or ``--target_heads_per_layer`` in each
kept layer, ``--target_ffn`` neurons per kept layer on average, ``--target_layers``).

Lagrangian. For each constrained quantity c (a ratio to the unpruned model) and its target t,
``lambda_1 * (c - t) + lambda_2 * (c - t) ** 2`` is added to the loss; the gates descend it, the
multipliers ascend it (their own AdamW with ``maximize``), so the multipliers grow until the
expected cost meets the target. t moves linearly from the stage's starting ratio to the target
over ``--l0_warmup_fraction`` of the stage.

End of the stage. The gates become masks that meet the target exactly: units are ranked by
their deterministic gate (head gate x block gate); a shape target keeps the top-k of each kind
(layers first; with ``--target_heads_per_layer H`` the top H heads of each kept layer, the layers
chosen among those with H heads left; during the stage the Lagrangian holds the total, H x the
kept layers); a cost target splits the budget between heads and neurons as the expected
gates do and fills it greedily, to within one neuron's cost. The kept units' deterministic
gate values are folded into the output projections' columns (exact: W (g * x) = (W diag g) x),
the gates removed, and the checkpoint is an ordinary masked one.

Warm start (``--l0_init importance``). Instead of every log-alpha at ``--gate_init``, each head
and neuron starts from its activation importance (``common.pruning.importance``, scored in eval
mode on the first ``--l0_init_pairs`` pairs of the stage's data): units are ranked within their
kind over all layers, the least important at ``-INIT_SPREAD`` below the most important, linearly
in rank, and one common offset puts the expected cost at the target (``--l0_init_cost target``)
or where the constant start puts it (``full``); block gates start at ``--gate_init``. So the
gates start where the best fixed criterion is, and the Lagrangian has only to keep them there.

Ramp (``--target_ramp F``, cost targets). The target moves from the stage's starting cost to its
value over the first F of the stage (in place of ``--l0_warmup_fraction``), and the expected
cost is held on that schedule: after every gate update one common shift of the head and neuron
log-alphas puts it exactly on the next step's target (bisection; the order of the gates and
the block gates are untouched). The Lagrangian still acts, but the cost no longer lags the
target: it is there at the end of the ramp, and the weights have the rest of the stage.

Noise comes from a generator seeded by (seed, step): every DDP rank draws the same gates, a
resumed stage the same as an unbroken one. Gates, multipliers and their optimizer state are
saved in each checkpoint (``l0_gates.pt``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from common.training.argtypes import arg, check_declared
from common.data.formats import DataError, TriplesStream
from common.pruning.importance import ActivationImportance
from common.models.arch import adapter_for, get_module, layer_stack
from common.evaluation.cost import analytic_macs, architecture
from common.evaluation.latency import linear_costs, load_table, predicted_ratio
from common.training.schedules import WarmupLinear
from common.models.structure import PruningState, zero_dead_weights
from common.io import save_torch
from common.kinds.base import length_chunks
from common.layout import GATES_FILE
from common.training.loop import Callback, Trainer

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
L0_INITS = ("constant", "importance")
INIT_COSTS = ("target", "full")
INIT_SPREAD = 6.0  # --l0_init importance: log-alpha of the most important unit - the least's


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(gate != 0) of the stretched hard-concrete distribution."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def deterministic(log_alpha: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def sample(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(log_alpha.device)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


@dataclass
class L0Args:
    target_macs_ratio: Optional[float] = arg(None, group="l0 gates", bounds=(0, 1, True, True),
        help="cost target: expected multiply-adds per sequence (common.evaluation.cost, at --max_length) "
             "/ the unpruned model's, e.g. 0.33")
    target_latency_ratio: Optional[float] = arg(None, group="l0 gates", bounds=(0, 1, True, True),
        help="cost target: predicted serving time per batch (--latency_table, at --max_length) / the "
             "unpruned model's, e.g. 0.5")
    latency_table: Optional[str] = arg(None, group="l0 gates",
        help="--target_latency_ratio: a latency table of the serving backend (bench/latency_table.py)")
    target_heads: Optional[int] = arg(None, group="l0 gates", bounds=(0, None, False, False),
        help="shape target: heads kept in total")
    target_heads_per_layer: Optional[int] = arg(None, group="l0 gates", bounds=(0, None, False, False),
        help="shape target: heads kept in each kept layer (BGE-M3's 24 x 16 -> 18 x 12: --target_layers 18 "
             "--target_heads_per_layer 12); instead of --target_heads")
    target_ffn: Optional[int] = arg(None, group="l0 gates", bounds=(0, None, False, False),
        help="shape target: FFN neurons kept per layer on average (total / kept layers)")
    target_layers: Optional[int] = arg(None, group="l0 gates", bounds=(1, None, False, False),
        help="shape target: layers kept (the others lose all heads and neurons)")
    l0_warmup_fraction: float = arg(0.5, group="l0 gates", bounds=(0, 1, False, False),
        help="share of the stage over which the target moves from the start to its value")
    l0_learning_rate: float = arg(0.05, group="l0 gates", bounds=(0, None, True, False),
        help="AdamW LR of the gates' log-alphas and of the Lagrange multipliers")
    gate_init: float = arg(3.0, group="l0 gates", bounds=(None, None, False, False),
        help="initial log-alpha (3: every gate starts open, P(z = 1) ~ 0.9)")
    l0_init: str = arg("constant", group="l0 gates", choices=L0_INITS,
        help="constant: every gate at --gate_init; importance: heads and neurons start from "
             "their activation importance, ranked (cost targets; common.pruning.l0)")
    l0_init_cost: str = arg("target", group="l0 gates", choices=INIT_COSTS,
        help="--l0_init importance: the expected cost the gates start at: the target, or "
             "full (where the constant start puts it)")
    l0_init_pairs: int = arg(512, group="l0 gates", bounds=(1, None, False, False),
        help="--l0_init importance: pairs (the first of the stage's data) the importance is scored on")
    target_ramp: Optional[float] = arg(None, group="l0 gates", bounds=(0, 1, False, False),
        help="cost targets: reach the target over this share of the stage (instead of "
             "--l0_warmup_fraction) and hold the expected cost on that schedule after every "
             "gate update (e.g. 0.2)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_declared(self)
        shape = (self.target_heads, self.target_heads_per_layer, self.target_ffn, self.target_layers)
        if self.target_macs_ratio is not None and self.target_latency_ratio is not None:
            raise ValueError("give either --target_macs_ratio or --target_latency_ratio, not both")
        if self.cost_ratio is not None and any(v is not None for v in shape):
            raise ValueError("give either --target_macs_ratio/--target_latency_ratio (a cost) or --target_heads/"
                             "--target_heads_per_layer/--target_ffn/--target_layers (a shape), not both")
        if self.cost_ratio is None and all(v is None for v in shape):
            raise ValueError("give a target: --target_macs_ratio, --target_latency_ratio, or "
                             "--target_heads/--target_heads_per_layer/--target_ffn/--target_layers")
        if self.target_heads is not None and self.target_heads_per_layer is not None:
            raise ValueError("give either --target_heads (in total) or --target_heads_per_layer (in each kept "
                             "layer), not both")
        if (self.target_latency_ratio is None) != (self.latency_table is None):
            raise ValueError("--target_latency_ratio and --latency_table go together")
        for flag, used in (("--l0_init importance", self.l0_init == "importance"),
                           ("--target_ramp", self.target_ramp is not None)):
            if used and self.target_macs_ratio is None:
                raise ValueError(f"{flag} works on a cost target: give --target_macs_ratio")

    def heads_in_total(self, num_layers: int) -> Optional[int]:
        """The heads a shape target keeps in all: --target_heads, or --target_heads_per_layer
        x the kept layers (--target_layers, else all ``num_layers``)."""
        if self.target_heads_per_layer is not None:
            return self.target_heads_per_layer * (self.target_layers or num_layers)
        return self.target_heads

    @property
    def cost_ratio(self) -> Optional[float]:
        """The cost target (MACs or predicted time), if the target is a cost."""
        return self.target_macs_ratio if self.target_macs_ratio is not None else self.target_latency_ratio


class Gates(nn.Module):
    """The log-alphas of one model (padded to the base config's head count and FFN width per
    layer; units not present or already dead are held shut by ``alive``)."""

    def __init__(self, state: PruningState, init: float, arch: dict, seq_len: int,
                 latency: tuple[float, float, float, float] | None = None):
        """``arch``: :func:`common.evaluation.cost.architecture` of the model (its hidden size, head and
        embedding projection: what 05 counts); ``seq_len``: the sequence the cost is of;
        ``latency``: (base, per layer, per head, per neuron) ms of a latency table
        (``common.evaluation.latency.linear_costs``): the cost a cost target is of, instead of MACs."""
        super().__init__()
        L, H, F = state.num_layers, state.num_heads, state.ffn_size
        self.head_size, self.hidden, self.seq_len = state.head_size, arch["hidden"], seq_len
        self.head = nn.Parameter(torch.full((L, H), float(init)))
        self.ffn = nn.Parameter(torch.full((L, F), float(init)))
        self.attn_block = nn.Parameter(torch.full((L,), float(init)))
        self.ffn_block = nn.Parameter(torch.full((L,), float(init)))
        # physical position -> original index, per layer; alive over the padded original indices
        head_alive = torch.zeros(L, H)
        ffn_alive = torch.zeros(L, F)
        for i in range(L):
            head_alive[i, state.kept_heads[i]] = 1.0
            ffn_alive[i, state.kept_ffn[i]] = 1.0
        self.register_buffer("head_alive", head_alive, persistent=False)
        self.register_buffer("ffn_alive", ffn_alive, persistent=False)
        self.present_heads = [list(p) for p in state.present_heads]
        self.present_ffn = [list(p) for p in state.present_ffn]
        # cost = base + per_head * heads + per_neuron * neurons (common.evaluation.cost, linear in both)
        self.cost_kw = dict(seq_len=seq_len, num_labels=arch["num_labels"], head=arch["head"],
                            embedding_size=arch.get("embedding_size"))
        self.base_macs = self.analytic([0] * L, [0] * L)
        self.per_head = self.analytic([1] + [0] * (L - 1), [0] * L) - self.base_macs
        self.per_neuron = self.analytic([0] * L, [1] + [0] * (L - 1)) - self.base_macs
        self.full_macs = self.analytic([H] * L, [F] * L)
        # the cost a cost target is of: MACs, or a latency table's ms (per layer constant in the base)
        if latency is None:
            self.cost_base, self.cost_head, self.cost_neuron = self.base_macs, self.per_head, self.per_neuron
        else:
            self.cost_base, self.cost_head, self.cost_neuron = latency[0] + L * latency[1], latency[2], latency[3]
        self.cost_full = self.cost_base + L * (H * self.cost_head + F * self.cost_neuron)
        self.z: dict[str, torch.Tensor] | None = None  # this step's sampled gates

    def analytic(self, heads_per_layer: list[int], ffn_per_layer: list[int]) -> int:
        """:func:`common.evaluation.cost.analytic_macs` of this model with the given widths."""
        return analytic_macs(self.hidden, self.head_size, heads_per_layer, ffn_per_layer, **self.cost_kw)

    # -- gate values ---------------------------------------------------------------------
    def resample(self, generator: torch.Generator) -> None:
        self.z = {name: sample(getattr(self, name), generator)
                  for name in ("head", "ffn", "attn_block", "ffn_block")}

    def values(self, training: bool) -> dict[str, torch.Tensor]:
        if training:
            if self.z is None:
                raise RuntimeError("gates used in training before resample()")
            return self.z
        return {name: deterministic(getattr(self, name)) for name in ("head", "ffn", "attn_block", "ffn_block")}

    def head_factor(self, layer: int, training: bool) -> torch.Tensor:
        """Per physical input column of the attention output projection of ``layer``."""
        z = self.values(training)
        g = (z["head"][layer] * self.head_alive[layer])[self.present_heads[layer]] * z["attn_block"][layer]
        return g.repeat_interleave(self.head_size)

    def ffn_factor(self, layer: int, training: bool) -> torch.Tensor:
        z = self.values(training)
        return (z["ffn"][layer] * self.ffn_alive[layer])[self.present_ffn[layer]] * z["ffn_block"][layer]

    # -- expectations ----------------------------------------------------------------------
    def expected_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Expected live heads and FFN neurons per layer (differentiable)."""
        heads = prob_nonzero(self.attn_block) * (prob_nonzero(self.head) * self.head_alive).sum(1)
        ffn = prob_nonzero(self.ffn_block) * (prob_nonzero(self.ffn) * self.ffn_alive).sum(1)
        return heads, ffn

    def expected_layers(self) -> torch.Tensor:
        return ((prob_nonzero(self.attn_block) + prob_nonzero(self.ffn_block)) / 2).sum()

    def macs(self, heads, ffn) -> torch.Tensor | float:
        return self.base_macs + self.per_head * heads.sum() + self.per_neuron * ffn.sum()

    def cost(self, heads, ffn) -> torch.Tensor | float:
        return self.cost_base + self.cost_head * heads.sum() + self.cost_neuron * ffn.sum()

    def expected_macs(self) -> torch.Tensor:
        return self.macs(*self.expected_counts())

    @torch.no_grad()
    def ratio_with_offset(self, offset: float, head: torch.Tensor | None = None,
                          ffn: torch.Tensor | None = None) -> float:
        """Expected cost / the unpruned model's with ``offset`` added to every head and neuron
        log-alpha (``head``/``ffn``: other log-alphas than the gates' own)."""
        head = self.head if head is None else head
        ffn = self.ffn if ffn is None else ffn
        heads = prob_nonzero(self.attn_block) * (prob_nonzero(head + offset) * self.head_alive).sum(1)
        neurons = prob_nonzero(self.ffn_block) * (prob_nonzero(ffn + offset) * self.ffn_alive).sum(1)
        return float(self.macs(heads, neurons) / self.full_macs)

    def offset_for(self, ratio: float, head: torch.Tensor | None = None, ffn: torch.Tensor | None = None) -> float:
        """The common log-alpha offset at which the expected cost ratio is ``ratio`` (bisection;
        the nearest end of [-50, 50] when no offset reaches it)."""
        low, high = -50.0, 50.0
        for _ in range(60):
            middle = (low + high) / 2
            if self.ratio_with_offset(middle, head, ffn) < ratio:
                low = middle
            else:
                high = middle
        return (low + high) / 2

    @torch.no_grad()
    def shift_to(self, ratio: float) -> None:
        """Add one offset to every head and neuron log-alpha so the expected cost is ``ratio``."""
        offset = self.offset_for(ratio)
        self.head.add_(offset)
        self.ffn.add_(offset)

    @torch.no_grad()
    def init_from_scores(self, head_scores: torch.Tensor, ffn_scores: torch.Tensor, ratio: float) -> None:
        """Head and neuron log-alphas from importance scores ``(layers, units)`` over the original
        indices: linear in each unit's rank within its kind (the most important 0, the least
        ``-INIT_SPREAD``), plus the offset that puts the expected cost at ``ratio``."""
        def ranked(scores: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
            flat, ok = scores.flatten().float(), alive.flatten().bool() & torch.isfinite(scores.flatten())
            quantile = torch.zeros_like(flat)
            count = int(ok.sum())
            if count:
                order = torch.argsort(flat[ok], stable=True)
                values = torch.empty(count)
                values[order] = torch.arange(count, dtype=torch.float32) / max(1, count - 1)
                quantile[ok] = values
            return (INIT_SPREAD * (quantile - 1)).view_as(scores)
        head = ranked(head_scores.cpu(), self.head_alive.cpu()).to(self.head.device)
        ffn = ranked(ffn_scores.cpu(), self.ffn_alive.cpu()).to(self.ffn.device)
        offset = self.offset_for(ratio, head, ffn)
        self.head.copy_(head + offset)
        self.ffn.copy_(ffn + offset)

    def sampled_counts(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Live heads and neurons per layer of one draw of the gates (z != 0)."""
        with torch.no_grad():
            z = {name: sample(getattr(self, name), generator) > 0
                 for name in ("head", "ffn", "attn_block", "ffn_block")}
            heads = z["attn_block"].float() * (z["head"].float() * self.head_alive).sum(1)
            ffn = z["ffn_block"].float() * (z["ffn"].float() * self.ffn_alive).sum(1)
        return heads, ffn

    # -- the end of the stage --------------------------------------------------------------
    @torch.no_grad()
    def final_masks(self, args: L0Args) -> tuple[list[list[int]], list[list[int]]]:
        """Kept original head and neuron indices per layer, meeting the target exactly."""
        L = self.head.shape[0]
        det = {name: deterministic(getattr(self, name)) for name in ("head", "ffn", "attn_block", "ffn_block")}
        head_score = det["head"] * det["attn_block"][:, None] + 1e-6 * prob_nonzero(self.head)
        ffn_score = det["ffn"] * det["ffn_block"][:, None] + 1e-6 * prob_nonzero(self.ffn)
        head_ok, ffn_ok = self.head_alive.bool().clone(), self.ffn_alive.bool().clone()
        if args.cost_ratio is not None:
            per_head, per_neuron = self.cost_head, self.cost_neuron
            budget = args.cost_ratio * self.cost_full - self.cost_base
            e_heads, e_ffn = (c.sum().item() for c in self.expected_counts())
            head_cost, ffn_cost = e_heads * per_head, e_ffn * per_neuron
            share = head_cost / (head_cost + ffn_cost) if head_cost + ffn_cost > 0 else 0.0
            k_heads = min(int(head_ok.sum()), max(0, math.floor(budget * share / per_head)))
            k_ffn = min(int(ffn_ok.sum()), max(0, math.floor((budget - k_heads * per_head) / per_neuron)))
            if k_ffn == int(ffn_ok.sum()):  # every neuron fits: give the rest of the budget to heads
                k_heads = min(int(head_ok.sum()), max(0, math.floor((budget - k_ffn * per_neuron) / per_head)))
        else:
            per_layer = args.target_heads_per_layer
            eligible = head_ok.sum(1) >= (per_layer or 0)  # a kept layer has the heads it must keep
            if args.target_layers is not None:
                if args.target_layers > L:
                    raise ValueError(f"--target_layers {args.target_layers} > the model's {L} layers")
                layer_score = (det["attn_block"] + det["ffn_block"]) / 2 + 1e-6 * (
                    prob_nonzero(self.attn_block) + prob_nonzero(self.ffn_block))
                layer_score = torch.where(eligible, layer_score, torch.full_like(layer_score, -1.0))
                dropped = torch.argsort(layer_score, descending=True, stable=True)[args.target_layers:]
                head_ok[dropped] = False
                ffn_ok[dropped] = False
                eligible[dropped] = True  # a dropped layer keeps nothing
            if per_layer is not None and not bool(eligible.all()):
                short = [i for i in range(L) if not bool(eligible[i])]
                raise ValueError(f"--target_heads_per_layer {per_layer}: layer(s) {short} have fewer heads "
                                 f"left ({[int(head_ok[i].sum()) for i in short]})")
            k_heads = int(head_ok.sum()) if args.target_heads is None else args.target_heads
            k_ffn = int(ffn_ok.sum()) if args.target_ffn is None else args.target_ffn * (args.target_layers or L)
            if k_heads > int(head_ok.sum()) or k_ffn > int(ffn_ok.sum()):
                raise ValueError(f"the target ({k_heads} heads, {k_ffn} FFN neurons) is more than the "
                                 f"model has ({int(head_ok.sum())}, {int(ffn_ok.sum())})")
        if args.cost_ratio is None and args.target_heads_per_layer is not None:  # the top H of each kept layer
            heads = [_top(head_score[i:i + 1], head_ok[i:i + 1], args.target_heads_per_layer)[0]
                     if head_ok[i].any() else [] for i in range(L)]
        else:
            heads = _top(head_score, head_ok, k_heads)
        ffn = _top(ffn_score, ffn_ok, k_ffn)
        return heads, ffn


def _top(score: torch.Tensor, allowed: torch.Tensor, k: int) -> list[list[int]]:
    """The k highest-scoring allowed (layer, unit) positions, as sorted unit lists per layer."""
    flat = torch.where(allowed, score, torch.full_like(score, -1.0)).flatten()
    chosen = torch.argsort(flat, descending=True, stable=True)[:k]
    width = score.shape[1]
    kept: list[list[int]] = [[] for _ in range(score.shape[0])]
    for index in chosen.tolist():
        kept[index // width].append(index % width)
    return [sorted(k_) for k_ in kept]


class GateHooks:
    """Forward pre-hooks multiplying the two output projections' inputs by the gates."""

    def __init__(self, model: nn.Module, gates: Gates):
        adapter = adapter_for(model.config)
        self._handles = []
        for i, layer in enumerate(layer_stack(model, adapter)):
            self._handles.append(get_module(layer, adapter.attn_out).register_forward_pre_hook(
                self._hook(gates.head_factor, i)))
            self._handles.append(get_module(layer, adapter.ffn_out).register_forward_pre_hook(
                self._hook(gates.ffn_factor, i)))

    @staticmethod
    def _hook(factor, index: int):
        def hook(module, args):
            g = factor(index, module.training)
            return (args[0] * g.to(device=args[0].device, dtype=args[0].dtype),) + args[1:]
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def lagrangian(c: torch.Tensor, t: float, lambdas: torch.Tensor) -> torch.Tensor:
    return lambdas[0] * (c - t) + lambdas[1] * (c - t) ** 2


class L0Callback(Callback):
    """03d: gates in the forward pass, the Lagrangian beside the loss, masks at the end."""

    def __init__(self, l0: L0Args):
        self.l0 = l0
        self.gates: Gates | None = None
        self.hooks: GateHooks | None = None
        self.lambdas: nn.Parameter | None = None
        self.start: dict[str, float] = {}
        self.finished = False

    def stage_args(self) -> dict:
        return asdict(self.l0)

    def check(self, trainer: Trainer) -> None:
        """A shape target beyond the model is refused before the stage trains (not at its end)."""
        state, a = trainer.state, self.l0
        if a.target_layers is not None and a.target_layers > state.num_layers:
            raise ValueError(f"--target_layers {a.target_layers} is more than the model has "
                             f"({state.num_layers} layers)")
        if a.target_heads is not None and a.target_heads > state.total_heads:
            raise ValueError(f"--target_heads {a.target_heads} is more than the model has "
                             f"({state.total_heads} heads)")
        if a.target_heads_per_layer is not None:
            layers = a.target_layers or state.num_layers
            full = sum(1 for h in state.heads_per_layer if h >= a.target_heads_per_layer)
            if full < layers:
                raise ValueError(f"--target_heads_per_layer {a.target_heads_per_layer} in {layers} layers is more "
                                 f"than the model has: {full} of its layers have that many heads (heads per "
                                 f"layer: {state.heads_per_layer})")
        if a.target_ffn is not None and a.target_ffn * (a.target_layers or state.num_layers) > state.total_ffn:
            raise ValueError(f"--target_ffn {a.target_ffn} per layer is more than the model has "
                             f"({state.total_ffn} FFN neurons in {state.num_layers} layers)")

    def schedule(self, trainer: Trainer) -> WarmupLinear:
        return WarmupLinear(trainer.total_steps, round(trainer.args.warmup_fraction * trainer.total_steps))

    # -- set-up and persistence ------------------------------------------------------------
    def on_start(self, trainer: Trainer) -> None:
        model, state = trainer.model, trainer.state
        latency = None
        if self.l0.latency_table:
            self.table = load_table(self.l0.latency_table)
            if (self.table["num_heads"], self.table["ffn_size"]) != (state.num_heads, state.ffn_size):
                raise ValueError(f"{self.l0.latency_table}: a table of layers with {self.table['num_heads']} heads and "
                                 f"{self.table['ffn_size']} FFN neurons; the model's have {state.num_heads} and "
                                 f"{state.ffn_size}")
            latency = linear_costs(self.table, trainer.args.max_length)
        self.gates = Gates(state, self.l0.gate_init, architecture(model), trainer.args.max_length,
                           latency).to(trainer.device)
        if self.l0.l0_init == "importance" and not trainer.resuming:
            self._init_from_importance(trainer)
        names = self.constraints()
        self.lambdas = nn.Parameter(torch.zeros(len(names), 2, device=trainer.device))
        self.gate_optimizer = torch.optim.AdamW(self.gates.parameters(), lr=self.l0.l0_learning_rate,
                                                weight_decay=0.0)
        self.lambda_optimizer = torch.optim.AdamW([self.lambdas], lr=self.l0.l0_learning_rate,
                                                  weight_decay=0.0, maximize=True)
        with torch.no_grad():
            self.start = {name: float(value) for name, value in self.quantities().items()}
        if trainer.resuming:
            self._load(Path(trainer.args.checkpoint_dir), trainer.device)
        self.hooks = GateHooks(model, self.gates)
        ramp = self.l0.l0_warmup_fraction if self.l0.target_ramp is None else self.l0.target_ramp
        self.warmup_steps = round(ramp * trainer.total_steps)
        self.final_step = trainer.total_steps  # the gates become masks after this step

    def _init_from_importance(self, trainer: Trainer) -> None:
        """--l0_init importance: activation importance of every head and neuron on the first
        --l0_init_pairs pairs of the stage's data (the same rows on every DDP rank; eval mode,
        no gradient, no RNG drawn), then :meth:`Gates.init_from_scores`."""
        args, model = trainer.args, trainer.model
        n = args.group_size
        stream = TriplesStream(args.train_triples_file, skip_triples=trainer.seen_pairs // n, passages=n)
        rows = list(islice(iter(stream), max(1, self.l0.l0_init_pairs // n)))
        if not rows:
            raise DataError(f"{args.train_triples_file}: no rows after the first {trainer.seen_pairs // n}: "
                            "nothing to score the --l0_init importance on")
        scorer = ActivationImportance(trainer.state)
        per_batch = max(1, args.batch_size // n)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(rows), per_batch):
                    batch = trainer.training_kind.forward(model, rows[start:start + per_batch], ()).batch
                    for _index, part in length_chunks(batch, trainer.training_kind.length_chunk):
                        scorer.observe(model, part)
        finally:
            model.train(was_training)
        full = self.gates.ratio_with_offset(0.0)
        ratio = self.l0.target_macs_ratio if self.l0.l0_init_cost == "target" else full
        self.gates.init_from_scores(torch.tensor(scorer.head_scores(model)), torch.tensor(scorer.ffn_scores(model)),
                                    ratio)

    def constraints(self) -> list[str]:
        if self.l0.target_macs_ratio is not None:
            return ["macs"]
        if self.l0.target_latency_ratio is not None:
            return ["latency"]
        heads = self.l0.target_heads if self.l0.target_heads_per_layer is None else self.l0.target_heads_per_layer
        return [name for name, value in (("heads", heads), ("ffn", self.l0.target_ffn),
                                         ("layers", self.l0.target_layers)) if value is not None]

    def quantities(self) -> dict[str, torch.Tensor]:
        """Each constrained quantity as a ratio to the unpruned model (differentiable)."""
        g = self.gates
        L, H = g.head.shape
        F = g.ffn.shape[1]
        heads, ffn = g.expected_counts()
        out = {}
        for name in self.constraints():
            if name == "macs":
                out[name] = g.macs(heads, ffn) / g.full_macs
            elif name == "latency":
                out[name] = g.cost(heads, ffn) / g.cost_full
            elif name == "heads":
                out[name] = heads.sum() / (L * H)
            elif name == "ffn":
                out[name] = ffn.sum() / (L * F)
            else:
                out[name] = g.expected_layers() / L
        return out

    def targets(self) -> dict[str, float]:
        g, a = self.gates, self.l0
        L, H = g.head.shape
        F = g.ffn.shape[1]
        final = {"macs": a.target_macs_ratio, "latency": a.target_latency_ratio, "heads": (a.heads_in_total(L) or 0) / (L * H),
                 "ffn": (a.target_ffn or 0) * (a.target_layers or L) / (L * F), "layers": (a.target_layers or 0) / L}
        return {name: final[name] for name in self.constraints()}

    def target_at(self, step: int) -> dict[str, float]:
        frac = 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)
        return {name: self.start[name] + (t - self.start[name]) * frac for name, t in self.targets().items()}

    def state_dict(self) -> dict:
        return {"kind": "l0", "targets": self.targets() if self.gates else {}, "finished": self.finished}

    def load_state_dict(self, data: dict) -> None:
        if data.get("kind") != "l0":
            raise ValueError(f"checkpoint was made by a {data.get('kind')!r} pruning stage, this script "
                             "prunes with L0 gates")
        self.finished = bool(data.get("finished"))
        if self.finished:
            raise ValueError("this checkpoint ends its L0 stage (its gates are masks now): nothing to resume")

    def save_files(self, trainer: Trainer, directory: Path) -> None:
        if self.finished or self.gates is None:
            return
        save_torch({"gates": self.gates.state_dict(), "lambdas": self.lambdas.detach().cpu(),
                    "gate_optimizer": self.gate_optimizer.state_dict(),
                    "lambda_optimizer": self.lambda_optimizer.state_dict(), "start": self.start},
                   directory / GATES_FILE)

    def _load(self, directory: Path, device) -> None:
        path = directory / GATES_FILE
        try:
            data = torch.load(path, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{path}: missing: the L0 stage cannot be resumed") from None
        except Exception as err:  # corrupt file, refused pickle
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path}: unreadable or unsafe: {first}") from None
        try:
            self.gates.load_state_dict(data["gates"])
            with torch.no_grad():
                self.lambdas.copy_(data["lambdas"].to(device))
            self.gate_optimizer.load_state_dict(data["gate_optimizer"])
            self.lambda_optimizer.load_state_dict(data["lambda_optimizer"])
            self.start = {str(k): float(v) for k, v in dict(data["start"]).items()}
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"{path}: not the gates of an L0 stage of this model ({type(err).__name__}: "
                             f"{first})") from None

    # -- the loop --------------------------------------------------------------------------
    def on_step_begin(self, trainer: Trainer) -> None:
        generator = torch.Generator().manual_seed(trainer.args.seed * 1_000_003 + trainer.step)
        self.gates.resample(generator)

    def extra_loss(self, trainer: Trainer) -> tuple[torch.Tensor, dict]:
        self._scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else 1.0
        values, targets = self.quantities(), self.target_at(trainer.step)
        term = sum(lagrangian(values[n], targets[n], self.lambdas[i]) for i, n in enumerate(values))
        parts = {"lagrangian": float(term.detach())}
        for name in values:
            parts[f"expected_{name}"] = round(float(values[name].detach()), 5)
            parts[f"target_{name}"] = round(targets[name], 5)
        return term, parts

    def on_step_end(self, trainer: Trainer, batch: dict) -> None:
        params = [*self.gates.parameters(), self.lambdas]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self._scale != 1.0:
                p.grad.div_(self._scale)
        if trainer.world_size > 1 and dist.is_initialized():
            for p in self.gates.parameters():  # the task loss's gate gradients differ by shard
                dist.all_reduce(p.grad)
                p.grad.div_(trainer.world_size)
        if all(torch.isfinite(p.grad).all() for p in params):
            self.gate_optimizer.step()
            self.lambda_optimizer.step()
        if self.l0.target_ramp is not None:  # hold the expected cost on the target schedule
            self.gates.shift_to(self.target_at(trainer.step)["macs"])
        self.gate_optimizer.zero_grad(set_to_none=True)
        self.lambda_optimizer.zero_grad(set_to_none=True)
        self.gates.z = None
        if trainer.step == self.final_step:
            self.finish(trainer)

    def finish(self, trainer: Trainer) -> None:
        """Gates -> exact masks; kept gate values folded into the weights; gates removed."""
        gates, state = self.gates, trainer.state
        heads, ffn = gates.final_masks(self.l0)
        factors = [(gates.head_factor(i, False), gates.ffn_factor(i, False)) for i in range(state.num_layers)]
        with torch.no_grad():
            expected = {name: round(float(v), 5) for name, v in self.quantities().items()}
        self.hooks.remove()
        adapter = adapter_for(trainer.model.config)
        with torch.no_grad():
            for i, layer in enumerate(layer_stack(trainer.model, adapter)):
                head_f, ffn_f = factors[i]
                attn_out, ffn_out = get_module(layer, adapter.attn_out), get_module(layer, adapter.ffn_out)
                attn_out.weight.mul_(head_f.to(attn_out.weight)[None, :])
                ffn_out.weight.mul_(ffn_f.to(ffn_out.weight)[None, :])
        keep_h, keep_f = [set(h) for h in heads], [set(f) for f in ffn]
        state.kept_heads = [[h for h in state.kept_heads[i] if h in keep_h[i]] for i in range(state.num_layers)]
        state.kept_ffn = [[n for n in state.kept_ffn[i] if n in keep_f[i]] for i in range(state.num_layers)]
        macs = gates.analytic(state.heads_per_layer, state.ffn_per_layer)
        event = {"seen_pairs": trainer.seen_pairs, "step": trainer.step, "l0": {
            "targets": self.targets(), "expected_at_end": expected, "macs_ratio": round(macs / gates.full_macs, 5),
            "lambdas": self.lambdas.detach().cpu().tolist(),
            "heads_per_layer": state.heads_per_layer, "ffn_per_layer": state.ffn_per_layer}}
        if self.l0.latency_table:  # the final shape's time as the table predicts it (bilinear, not the fit)
            event["l0"]["predicted_latency_ratio"] = round(predicted_ratio(
                self.table, state.heads_per_layer, state.ffn_per_layer, trainer.args.max_length), 5)
        state.history.append(event)
        trainer.masks.refresh()
        zero_dead_weights(trainer.model, state, trainer.optimizer)
        self.finished = True
        trainer.log_event("prune", lr=trainer.lr(), macs_ratio=event["l0"]["macs_ratio"],
                          heads_per_layer=state.heads_per_layer, ffn_per_layer=state.ffn_per_layer)
