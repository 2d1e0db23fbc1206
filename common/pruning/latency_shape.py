"""The shape a predicted-time target asks for (03c ``--target_latency_ratio --latency_table``).

:func:`choose_shape` picks, per prunable layer, the heads and FFN width to keep so that the
predicted serving time over the unpruned model's is at most the target while removing the
least importance. Widths move only to the latency table's measured grid points (its ``heads``
and ``ffn`` axes; a layer not pruned keeps its width), so no shape between measured points is
chosen. Greedy: while the predicted time is above the target, every prunable layer offers
every move down the grid (heads, FFN width, or both: a whole layer with
``allow_empty_layers``); the move with the least importance lost per ms saved is taken. A
move that saves no time (a flat stretch of the table, a width that is slower than a wider
one) is never taken on its own, so a shape that saves multiply-adds but not time is not chosen.

Importance is the pruning criterion's per-unit score (lowest go first), each kind normalised to
a share of its total over the prunable layers' live units: removing every head and removing
every FFN neuron each lose 1, so heads and neurons are compared on one scale.
"""
from __future__ import annotations

import math
from itertools import accumulate
from typing import Callable

from common.evaluation.latency import load_table, predict_ms


class LatencyCost:
    """A latency table read as per-layer costs at one length: ``layer(h, f)`` is a layer's ms
    over the base (bilinear, as :func:`common.evaluation.latency.predict_ms` adds them)."""

    def __init__(self, path: str, num_heads: int, ffn_size: int, length: int):
        self.path, self.table, self.length = path, load_table(path), length
        t = self.table
        if (t["num_heads"], t["ffn_size"]) != (num_heads, ffn_size):
            raise ValueError(f"{path}: a table of layers with {t['num_heads']} heads and {t['ffn_size']} FFN "
                             f"neurons; the model's have {num_heads} and {ffn_size}")
        self._cache: dict[tuple[int, int], float] = {}
        self.base = predict_ms(t, [], [], length)
        self.full = self.base + t["layers"] * self.layer(num_heads, ffn_size)

    def layer(self, heads: int, ffn: int) -> float:
        key = (heads, ffn)
        if key not in self._cache:
            self._cache[key] = predict_ms(self.table, [heads], [ffn], self.length) - self.base
        return self._cache[key]

    def ratio(self, heads_per_layer: list[int], ffn_per_layer: list[int]) -> float:
        """Predicted time of these widths over the unpruned model's (``predicted_ratio``)."""
        return (self.base + sum(self.layer(h, f) for h, f in zip(heads_per_layer, ffn_per_layer))) / self.full

    @property
    def head_grid(self) -> list[int]:
        return list(self.table["heads"])

    @property
    def ffn_grid(self) -> list[int]:
        return list(self.table["ffn"])


def _moves(grid: list[int], current: int, floor: int) -> list[int]:
    """The widths a layer at ``current`` may keep: itself and the grid points below it."""
    return [current] + [v for v in grid if floor <= v < current]


def fastest_ratio(cost_layer: Callable[[int, int], float], base: float, full: float,
                  heads: list[int], ffn: list[int], layers: list[int], head_grid: list[int],
                  ffn_grid: list[int], floor: int) -> float:
    """The lowest ratio reachable: every prunable layer at its fastest allowed grid shape."""
    total = base
    for i, (h, f) in enumerate(zip(heads, ffn)):
        if i in layers:
            total += min(cost_layer(a, b) for a in _moves(head_grid, h, floor) for b in _moves(ffn_grid, f, floor))
        else:
            total += cost_layer(h, f)
    return total / full


def _shares(scores: list[list[float]], kept: list[list[int]], layers: list[int], what: str) -> dict[int, list[float]]:
    """Per layer, the live units' scores ascending, each over the kind's total (prunable layers)."""
    values = {i: sorted(scores[i][u] for u in kept[i]) for i in layers}
    flat = [v for row in values.values() for v in row]
    if any(not math.isfinite(v) or v < 0 for v in flat):
        raise ValueError(f"--target_latency_ratio needs finite, non-negative {what} scores from the "
                         "pruning criterion (--importance)")
    total = sum(flat)
    return {i: [v / total if total > 0 else 1 / len(flat) for v in row] for i, row in values.items()}


def choose_shape(head_scores: list[list[float]], ffn_scores: list[list[float]], kept_heads: list[list[int]],
                 kept_ffn: list[list[int]], layers: list[int], cost_layer: Callable[[int, int], float],
                 base: float, full: float, ratio: float, head_grid: list[int], ffn_grid: list[int],
                 floor: int = 1) -> dict:
    """The greedy of the module docstring. ``cost_layer(h, f)``: one layer's cost over ``base``;
    ``full``: the unpruned model's cost; ``layers``: the prunable layers; ``floor``: the fewest
    heads and neurons a layer keeps (1, or 0 with ``allow_empty_layers``). Returns the chosen
    ``heads_per_layer``, ``ffn_per_layer``, their ``predicted_ratio`` and ``importance_lost``."""
    heads = [len(k) for k in kept_heads]
    ffn = [len(k) for k in kept_ffn]
    start_h, start_f = list(heads), list(ffn)
    share_h = _shares(head_scores, kept_heads, layers, "head")
    share_f = _shares(ffn_scores, kept_ffn, layers, "FFN neuron")
    prefix_h = {i: [0.0, *accumulate(row)] for i, row in share_h.items()}
    prefix_f = {i: [0.0, *accumulate(row)] for i, row in share_f.items()}

    def lost(prefix, start, now, to):  # the units ranked start-now .. start-to (lowest first)
        return prefix[start - to] - prefix[start - now]

    total = base + sum(cost_layer(h, f) for h, f in zip(heads, ffn))
    removed = 0.0
    while total > ratio * full * (1 + 1e-9):
        best = None
        for i in layers:
            now = cost_layer(heads[i], ffn[i])
            for h in _moves(head_grid, heads[i], floor):
                for f in _moves(ffn_grid, ffn[i], floor):
                    saved = now - cost_layer(h, f)
                    if (h, f) == (heads[i], ffn[i]) or saved <= 1e-12 * full:
                        continue
                    cost = (lost(prefix_h[i], start_h[i], heads[i], h) + lost(prefix_f[i], start_f[i], ffn[i], f))
                    key = (cost / saved, -saved, i, h, f)
                    if best is None or key < best[0]:
                        best = (key, i, h, f, saved, cost)
        if best is None:
            raise ValueError(f"--target_latency_ratio {ratio} cannot be met: every prunable layer is at its "
                             f"fastest grid shape, predicted ratio {total / full:.4f}")
        _key, i, h, f, saved, cost = best
        heads[i], ffn[i] = h, f
        total -= saved
        removed += cost
    return {"heads_per_layer": heads, "ffn_per_layer": ffn, "predicted_ratio": round(total / full, 6),
            "importance_lost": round(removed, 6)}

