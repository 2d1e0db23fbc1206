"""Pruning as a training-loop callback: heads (03a), FFN neurons (03b) or both (03c).

A stage is an optional warmup, then ``len(events)`` pruning cycles and one recovery cycle,
all of ``cycle_steps`` optimizer steps. The LR (``schedules.CosineRestarts``) restarts at its
peak at the start of every cycle, i.e. right after every prune event. The importance scorer
(``--importance``, any :class:`common.pruning.importance.Importance` registered by name; default
head confidence + FFN L1) sees the training batches of the last ``score_fraction`` of each
cycle when it needs data; at the cycle's last step the lowest-scoring heads and neurons are
masked, their weights and optimizer state zeroed, and the event (what went, with its scores)
appended to the pruning history.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from common.training.argtypes import arg, check_declared
from common.pruning.importance import Importance, get_importance, importance_names, select_ffn, select_heads
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

    @property
    def num_events(self) -> int:
        return max(len(self.head_events), len(self.ffn_events))


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
    warmup_steps = prune.num_warmup_samples // batch_size
    cycle_steps = (total_steps - warmup_steps) // (events + 1)  # + 1 recovery cycle
    if cycle_steps < 1:
        raise ValueError(f"{total_steps} steps cannot hold {warmup_steps} warmup steps and "
                         f"{events + 1} cycles: raise --num_training_samples")
    return PrunePlan(warmup_steps, cycle_steps,
                     _spread(heads_total, events) if heads_total else [],
                     _spread(ffn_total, events) if ffn_total else [])


class PruneCallback(Callback):
    def __init__(self, kind: str, prune: PruneArgs):
        if kind not in ("heads", "ffn", "mixed"):
            raise ValueError(f"kind must be heads, ffn or mixed, got {kind!r}")
        self.kind, self.prune = kind, prune
        self.plan: PrunePlan | None = None
        self.scorer: Importance | None = None  # made for the model in on_start
        self._pending_scorer: dict | None = None

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
        if not trainer.resuming:
            args = trainer.args
            self.plan = make_plan(self.kind, p, state, args.num_training_samples // args.batch_size,
                                  args.batch_size)

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
        window_start = math.floor(self.plan.cycle_steps * (1 - self.prune.score_fraction))
        if within > window_start and self.scorer.needs_data(heads, ffn):
            self.scorer.observe(trainer.model, batch)
        if within == self.plan.cycle_steps:
            self.prune_now(trainer, heads, ffn)

    def prune_now(self, trainer: Trainer, heads: int, ffn_per_layer: int) -> None:
        state, excluded = trainer.state, self.prune.excluded()
        event = {"seen_pairs": trainer.seen_pairs, "step": trainer.step}
        scorer = self.scorer
        if trainer.world_size > 1 and scorer.needs_data(heads, ffn_per_layer):
            # every rank scored its own shard: sum, then all agree
            scorer.load_flat(all_reduce_sum(scorer.flat(), trainer.device))
        if heads:
            scores = scorer.head_scores(trainer.model)
            chosen = select_heads(scores, state, heads, excluded, self.prune.allow_empty_layers)
            for layer, head in chosen:
                state.kept_heads[layer].remove(head)
            event["heads"] = [{"layer": l, "head": h, scorer.head_key: scores[l][h]} for l, h in chosen]
            if scorer.count_key:
                event[scorer.count_key] = scorer.observed()
        if ffn_per_layer:
            scores = scorer.ffn_scores(trainer.model)
            chosen = select_ffn(scores, state, ffn_per_layer, self.prune.scope, excluded,
                                self.prune.allow_empty_layers)
            for layer, neurons in chosen.items():
                gone = set(neurons)
                state.kept_ffn[layer] = [n for n in state.kept_ffn[layer] if n not in gone]
            event["ffn"] = {str(l): {"neurons": n, scorer.ffn_key: [scores[l][x] for x in n]}
                            for l, n in chosen.items()}
        scorer.reset()
        state.history.append(event)
        trainer.masks.refresh()
        zero_dead_weights(trainer.model, state, trainer.optimizer)
        trainer.log_event("prune", lr=trainer.lr(),
                          removed_heads=len(event.get("heads", [])),
                          removed_ffn=sum(len(v["neurons"]) for v in event.get("ffn", {}).values()))

    def state_dict(self) -> dict:
        return {"kind": self.kind, "plan": asdict(self.plan),
                "confidence": self.scorer.state_dict() if self.scorer else None}  # key kept for old checkpoints

    def load_state_dict(self, data: dict) -> None:
        if data.get("kind") != self.kind:
            raise ValueError(f"checkpoint was made by a {data.get('kind')!r} pruning stage, "
                             f"this script prunes {self.kind!r}")
        self.plan = PrunePlan(**data["plan"])
        self._pending_scorer = data.get("confidence")
