"""Pruning as a training-loop callback: heads (03a), FFN neurons (03b) or both (03c).

A stage is an optional warmup, then ``len(events)`` pruning cycles and one recovery cycle,
all of ``cycle_steps`` optimizer steps. The LR (``schedules.CosineRestarts``) restarts at its
peak at the start of every cycle, i.e. right after every prune event. The importance scorer
(``--importance``, any :class:`common.pruning.importance.Importance` registered by name; default
head confidence + FFN L1) sees the training batches of the last ``score_fraction`` of each
cycle when it needs data; at the cycle's last step the lowest-scoring heads and neurons are
masked, their weights and optimizer state zeroed, and the event (what went, with its scores)
appended to the pruning history.

03c with ``--target_latency_ratio R --latency_table FILE`` (instead of --target_heads/--target_ffn):
at the first event the per-layer shape to reach is chosen from the criterion's scores and the
table (``common.pruning.latency_shape``: predicted time <= R of the unpruned model's, widths on
the table's grid, least importance lost per ms saved); every event then removes, per layer,
its share of what is left to that shape (the lowest-scoring units of the layer), the last event
reaching it. The shape, its predicted ratio and each event's predicted ratio go into the
pruning history (pruning.json) and metrics.jsonl.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from common.kinds.base import length_chunks
from common.training.argtypes import arg, check_declared
from common.pruning.importance import (Importance, get_importance, importance_names, select_ffn, select_heads,
                                       select_per_layer)
from common.pruning.latency_shape import LatencyCost, choose_shape, fastest_ratio
from common.training.schedules import CosineRestarts
from common.models.structure import PruningState, zero_dead_weights
from common.training.distributed import all_reduce_sum
from common.training.loop import Callback, Trainer


@dataclass
class PruneArgs:
    target_sparsity: Optional[float] = arg(None, group="pruning", bounds=(0, 1, True, True),
        help="share of the prunable heads/neurons to remove by the end")
    num_prune_cycles: Optional[int] = arg(None, group="pruning", bounds=(1, None, False, False),
        help="prune events (03b/03c); 03a prunes one head per cycle")
    target_heads: Optional[int] = arg(None, group="pruning", bounds=(0, None, False, False),
        help="03c: total heads to keep")
    target_ffn: Optional[int] = arg(None, group="pruning", bounds=(0, None, False, False),
        help="03c: FFN width to keep per prunable layer")
    target_latency_ratio: Optional[float] = arg(None, group="pruning", bounds=(0, 1, True, False),
        help="03c: predicted serving time (--latency_table, at --max_length) / the unpruned model's to reach, "
             "e.g. 0.5; the per-layer shape is chosen on the table's grid (instead of --target_heads/--target_ffn)")
    latency_table: Optional[str] = arg(None, group="pruning",
        help="03c --target_latency_ratio: a latency table of the serving backend (bench/latency_table.py)")
    num_warmup_samples: int = arg(0, group="pruning", bounds=(0, None, False, False),
        help="pairs trained before the first cycle")
    score_fraction: float = arg(0.2, group="pruning", bounds=(0, 1, True, False),
        help="head scoring window: last share of each cycle")
    exclude_layers: str = arg("0", group="pruning", help="comma-separated layers never pruned ('' for none)")
    allow_empty_layers: bool = arg(False, group="pruning", help="a layer may lose all its heads/neurons")
    scope: str = arg("layer", group="pruning", choices=("layer", "global"), help="FFN selection: per layer or global")
    min_lr_ratio: float = arg(0.0, group="pruning", bounds=(0, 1, False, False),
        help="LR at the end of a cycle / peak")
    importance: str = arg("confidence", group="pruning",
        help=f"pruning criterion, one of {', '.join(importance_names())}: 'confidence' (alias "
             "'reference'): head confidence + FFN L1 (the study's criteria); 'activation': both "
             "scored from activations over the scoring window; 'l1': weight norms "
             "(see common.pruning.importance)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        check_declared(self)
        if self.importance not in importance_names():
            raise ValueError(f"--importance must be one of {', '.join(importance_names())}, "
                             f"got {self.importance!r}")
        if (self.target_latency_ratio is None) != (self.latency_table is None):
            raise ValueError("--target_latency_ratio and --latency_table go together")
        if self.target_latency_ratio is not None:
            other = [f"--{k}" for k in ("target_heads", "target_ffn", "target_sparsity") if getattr(self, k) is not None]
            if other:
                raise ValueError(f"give either --target_latency_ratio (with --latency_table) or {'/'.join(other)}, "
                                 "not both")
            if self.scope != "layer":
                raise ValueError("--scope global does not go with --target_latency_ratio: the latency target "
                                 "chooses a shape per layer")
        try:
            self.excluded()
        except ValueError:
            raise ValueError(f"--exclude_layers must be comma-separated layer numbers, "
                             f"got {self.exclude_layers!r}") from None

    def excluded(self) -> set[int]:
        return {int(x) for x in self.exclude_layers.split(",") if x.strip()}


@dataclass
class PrunePlan:
    warmup_steps: int
    cycle_steps: int
    head_events: list[int]  # heads removed at each event
    ffn_events: list[int]  # neurons removed per prunable layer (scope layer) at each event
    latency_events: int = 0  # --target_latency_ratio: events toward the shape chosen at the first
    shape: Optional[dict] = None  # that shape (heads_per_layer, ffn_per_layer, predicted_ratio, ...)

    @property
    def num_events(self) -> int:
        return max(len(self.head_events), len(self.ffn_events), self.latency_events)


def _spread(total: int, events: int) -> list[int]:
    """Split ``total`` into ``events`` near-equal integer amounts."""
    return [round(total * (k + 1) / events) - round(total * k / events) for k in range(events)]


def make_plan(kind: str, prune: PruneArgs, state: PruningState, total_steps: int,
              batch_size: int) -> PrunePlan:
    excluded = prune.excluded()
    layers = [i for i in range(state.num_layers) if i not in excluded]
    prunable_heads = state.num_heads * len(layers)
    live_heads = sum(len(state.kept_heads[i]) for i in layers)
    live_ffn = min((len(state.kept_ffn[i]) for i in layers), default=0)
    heads_total = ffn_total = 0
    if prune.target_latency_ratio is not None:
        if kind != "mixed":
            raise ValueError("--target_latency_ratio is a target of 03c_prune_mixed.py")
        events = prune.num_prune_cycles or 10
        return PrunePlan(*_cycles(prune, total_steps, batch_size, events), [], [], latency_events=events)
    if kind in ("heads", "mixed"):
        if prune.target_heads is not None:
            heads_total = state.total_heads - prune.target_heads
        elif prune.target_sparsity is not None:
            heads_total = live_heads - round(prunable_heads * (1 - prune.target_sparsity))
        else:
            raise ValueError("give --target_sparsity (or, for 03c, --target_heads)")
    if kind in ("ffn", "mixed"):
        if prune.target_ffn is not None:
            ffn_total = live_ffn - prune.target_ffn
        elif prune.target_sparsity is not None:
            ffn_total = live_ffn - round(state.ffn_size * (1 - prune.target_sparsity))
        else:
            raise ValueError("give --target_sparsity (or, for 03c, --target_ffn)")
    if heads_total < 0 or ffn_total < 0:
        raise ValueError(f"the model is already below the target (heads to remove {heads_total}, "
                         f"neurons per layer to remove {ffn_total})")
    if kind == "heads":
        events = heads_total
    else:
        events = prune.num_prune_cycles or 10
    if events < 1:
        raise ValueError("nothing to prune: the target equals the current structure")
    return PrunePlan(*_cycles(prune, total_steps, batch_size, events),
                     _spread(heads_total, events) if heads_total else [],
                     _spread(ffn_total, events) if ffn_total else [])


def _cycles(prune: PruneArgs, total_steps: int, batch_size: int, events: int) -> tuple[int, int]:
    """Warmup steps and steps per cycle for ``events`` prune cycles + 1 recovery cycle."""
    warmup_steps = prune.num_warmup_samples // batch_size
    cycle_steps = (total_steps - warmup_steps) // (events + 1)  # + 1 recovery cycle
    if cycle_steps < 1:
        raise ValueError(f"{total_steps} steps cannot hold {warmup_steps} warmup steps and "
                         f"{events + 1} cycles: raise --num_training_samples")
    return warmup_steps, cycle_steps


class PruneCallback(Callback):
    def __init__(self, kind: str, prune: PruneArgs):
        if kind not in ("heads", "ffn", "mixed"):
            raise ValueError(f"kind must be heads, ffn or mixed, got {kind!r}")
        self.kind, self.prune = kind, prune
        self.plan: PrunePlan | None = None
        self.scorer: Importance | None = None  # made for the model in on_start
        self._pending_scorer: dict | None = None
        self.cost: LatencyCost | None = None  # --latency_table at --max_length (check)

    def stage_args(self) -> dict:
        return {"prune_kind": self.kind, **asdict(self.prune)}

    def check(self, trainer: Trainer) -> None:
        """Targets beyond the model, and a plan the stage cannot hold, are refused before
        anything is written (a resumed stage keeps its saved plan)."""
        state, p = trainer.state, self.prune
        if p.target_heads is not None and p.target_heads > state.total_heads:
            raise ValueError(f"--target_heads {p.target_heads} is more than the model has "
                             f"({state.total_heads} heads)")
        if p.target_ffn is not None and p.target_ffn > state.ffn_size:
            raise ValueError(f"--target_ffn {p.target_ffn} is more than the model's FFN width "
                             f"({state.ffn_size} neurons per layer)")
        bad = sorted(i for i in p.excluded() if not 0 <= i < state.num_layers)
        if bad:
            raise ValueError(f"--exclude_layers {p.exclude_layers}: the model has layers 0..{state.num_layers - 1}")
        if p.latency_table:
            self.check_latency(trainer)
        if not trainer.resuming:
            args = trainer.args
            self.plan = make_plan(self.kind, p, state, args.num_training_samples // args.batch_size,
                                  args.batch_size)

    def check_latency(self, trainer: Trainer) -> None:
        """The table fits the model and the target can be met (and is not met already)."""
        state, p = trainer.state, self.prune
        if self.kind != "mixed":
            raise ValueError("--target_latency_ratio is a target of 03c_prune_mixed.py")
        self.cost = LatencyCost(p.latency_table, state.num_heads, state.ffn_size, trainer.args.max_length)
        if trainer.resuming:
            return
        layers = [i for i in range(state.num_layers) if i not in p.excluded()]
        now = self.cost.ratio(state.heads_per_layer, state.ffn_per_layer)
        if now <= p.target_latency_ratio:
            raise ValueError(f"--target_latency_ratio {p.target_latency_ratio}: the model's predicted ratio is "
                             f"already {now:.4f} ({p.latency_table})")
        best = fastest_ratio(self.cost.layer, self.cost.base, self.cost.full, state.heads_per_layer,
                             state.ffn_per_layer, layers, self.cost.head_grid, self.cost.ffn_grid, self._floor())
        if best > p.target_latency_ratio:
            raise ValueError(f"--target_latency_ratio {p.target_latency_ratio} cannot be met: with every prunable "
                             f"layer ({', '.join(map(str, layers)) or 'none'}) at its fastest shape on the grid of "
                             f"{p.latency_table} the predicted ratio is {best:.4f}"
                             + ("" if p.allow_empty_layers else " (--allow_empty_layers lets a layer go)"))

    def _floor(self) -> int:
        return 0 if self.prune.allow_empty_layers else 1

    def schedule(self, trainer: Trainer) -> CosineRestarts:
        """The plan is made from the stage's starting structure (restored on resume)."""
        if self.plan is None:
            self.plan = make_plan(self.kind, self.prune, trainer.state, trainer.total_steps,
                                  trainer.args.batch_size)
        return CosineRestarts(self.plan.cycle_steps, self.plan.warmup_steps, self.prune.min_lr_ratio,
                              cycles=self.plan.num_events + 1, total_steps=trainer.total_steps)

    def on_start(self, trainer: Trainer) -> None:
        self.scorer = get_importance(self.prune.importance, trainer.state)
        if self._pending_scorer is not None:
            self.scorer.load_state_dict(self._pending_scorer)

    def _position(self, step: int) -> tuple[int, int] | None:
        """(cycle index, 1-based step within the cycle) of a completed step, or None in warmup."""
        if step <= self.plan.warmup_steps:
            return None
        offset = step - self.plan.warmup_steps - 1
        return offset // self.plan.cycle_steps, offset % self.plan.cycle_steps + 1

    def on_step_end(self, trainer: Trainer, batch: dict) -> None:
        position = self._position(trainer.step)
        if position is None or position[0] >= self.plan.num_events:
            return
        cycle, within = position
        heads = self.plan.head_events[cycle] if self.plan.head_events else 0
        ffn = self.plan.ffn_events[cycle] if self.plan.ffn_events else 0
        latency = bool(self.plan.latency_events)  # per-layer amounts, known at the event: score both kinds
        window_start = math.floor(self.plan.cycle_steps * (1 - self.prune.score_fraction))
        if within > window_start and self.scorer.needs_data(heads or latency, ffn or latency):
            # the scores are sums over sequences: under --group_by_length the pass runs in
            # length-sorted chunks, each padded only to its own longest (as a cross-encoder's
            # training forward does; a bi-encoder's passages alike)
            for _index, part in length_chunks(batch, trainer.training_kind.length_chunk):
                self.scorer.observe(trainer.model, part)
        if within == self.plan.cycle_steps:
            if latency:
                self.prune_to_shape(trainer, cycle)
            else:
                self.prune_now(trainer, heads, ffn)

    def prune_to_shape(self, trainer: Trainer, cycle: int) -> None:
        """A latency-target event: the shape is chosen at the first; each layer removes its share
        of what is left to it (the last event reaches it)."""
        state, scorer, layers = trainer.state, self.scorer, [i for i in range(trainer.state.num_layers)
                                                             if i not in self.prune.excluded()]
        if trainer.world_size > 1 and scorer.needs_data(True, True):
            scorer.load_flat(all_reduce_sum(scorer.flat(), trainer.device))
        head_scores, ffn_scores = scorer.head_scores(trainer.model), scorer.ffn_scores(trainer.model)
        first = self.plan.shape is None
        if first:
            cost = self.cost
            shape = choose_shape(head_scores, ffn_scores, state.kept_heads, state.kept_ffn, layers, cost.layer,
                                 cost.base, cost.full, self.prune.target_latency_ratio, cost.head_grid,
                                 cost.ffn_grid, self._floor())
            self.plan.shape = {"target_latency_ratio": self.prune.target_latency_ratio,
                               "latency_table": self.prune.latency_table, "length": trainer.args.max_length,
                               "backend": cost.table["backend"], "host": cost.table["host"], **shape}
        left = self.plan.latency_events - cycle
        heads = {i: round((state.heads_per_layer[i] - self.plan.shape["heads_per_layer"][i]) / left) for i in layers}
        ffn = {i: round((state.ffn_per_layer[i] - self.plan.shape["ffn_per_layer"][i]) / left) for i in layers}
        chosen_heads = select_per_layer(head_scores, state.kept_heads, heads)
        if first:
            trainer.log_event("latency_shape", **{k: v for k, v in self.plan.shape.items() if k != "host"})
        extra = {"latency_shape": self.plan.shape} if first else {}
        self._apply(trainer, [(l, h) for l, hs in chosen_heads.items() for h in hs], head_scores,
                    select_per_layer(ffn_scores, state.kept_ffn, ffn), ffn_scores, extra)

    def prune_now(self, trainer: Trainer, heads: int, ffn_per_layer: int) -> None:
        state, excluded = trainer.state, self.prune.excluded()
        scorer = self.scorer
        if trainer.world_size > 1 and scorer.needs_data(heads, ffn_per_layer):
            # every rank scored its own shard: sum, then all agree
            scorer.load_flat(all_reduce_sum(scorer.flat(), trainer.device))
        chosen_heads, head_scores, chosen_ffn, ffn_scores = [], None, {}, None
        if heads:
            head_scores = scorer.head_scores(trainer.model)
            chosen_heads = select_heads(head_scores, state, heads, excluded, self.prune.allow_empty_layers)
        if ffn_per_layer:
            ffn_scores = scorer.ffn_scores(trainer.model)
            chosen_ffn = select_ffn(ffn_scores, state, ffn_per_layer, self.prune.scope, excluded,
                                    self.prune.allow_empty_layers)
        self._apply(trainer, chosen_heads, head_scores, chosen_ffn, ffn_scores)

    def _apply(self, trainer: Trainer, heads: list[tuple[int, int]], head_scores, ffn: dict[int, list[int]],
               ffn_scores, extra: dict | None = None) -> None:
        """Mask the chosen units, zero their weights and optimizer state, record the event."""
        state, scorer = trainer.state, self.scorer
        event = {"seen_pairs": trainer.seen_pairs, "step": trainer.step, **(extra or {})}
        if heads:
            scores, chosen = head_scores, heads
            for layer, head in chosen:
                state.kept_heads[layer].remove(head)
            event["heads"] = [{"layer": l, "head": h, scorer.head_key: scores[l][h]} for l, h in chosen]
            if scorer.count_key:
                event[scorer.count_key] = scorer.observed()
        if ffn:
            scores, chosen = ffn_scores, ffn
            for layer, neurons in chosen.items():
                gone = set(neurons)
                state.kept_ffn[layer] = [n for n in state.kept_ffn[layer] if n not in gone]
            event["ffn"] = {str(l): {"neurons": n, scorer.ffn_key: [scores[l][x] for x in n]}
                            for l, n in chosen.items()}
        latency = {}
        if self.cost is not None:  # the shape's time as the table predicts it, after this event
            latency["predicted_latency_ratio"] = round(self.cost.ratio(state.heads_per_layer, state.ffn_per_layer), 6)
            event.update(latency)
        scorer.reset()
        state.history.append(event)
        trainer.masks.refresh()
        zero_dead_weights(trainer.model, state, trainer.optimizer)
        trainer.log_event("prune", lr=trainer.lr(),
                          removed_heads=len(event.get("heads", [])),
                          removed_ffn=sum(len(v["neurons"]) for v in event.get("ffn", {}).values()), **latency)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "plan": asdict(self.plan),
                "confidence": self.scorer.state_dict() if self.scorer else None}  # key kept for old checkpoints

    def load_state_dict(self, data: dict) -> None:
        if data.get("kind") != self.kind:
            raise ValueError(f"checkpoint was made by a {data.get('kind')!r} pruning stage, "
                             f"this script prunes {self.kind!r}")
        self.plan = PrunePlan(**data["plan"])
        self._pending_scorer = data.get("confidence")
