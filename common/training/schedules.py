"""Learning-rate schedules as picklable callables (their state saves in ``scheduler.pt``).

Both are multiplicative factors for ``torch.optim.lr_scheduler.LambdaLR`` over optimizer steps.
"""
from __future__ import annotations

import math


class WarmupLinear:
    """monoBERT's schedule: linear warmup to the peak, then linear decay to zero."""

    def __init__(self, total_steps: int, warmup_steps: int):
        self.total_steps, self.warmup_steps = total_steps, warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        remaining = self.total_steps - self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, remaining))


class CosineRestarts:
    """Cosine annealing with hard restarts every ``cycle_steps`` (learning-rate rewinding).

    The LR returns to its peak at the start of every cycle, i.e. right after each prune event,
    and decays to ``min_ratio`` x peak over the cycle. ``warmup_steps`` (optional) is a linear
    ramp before the first cycle; cycle k then spans steps [warmup + k*cycle, warmup + (k+1)*cycle).
    With ``cycles`` and ``total_steps`` the last cycle runs to ``total_steps`` (it takes the
    steps that do not fill a whole cycle), so the LR never restarts after the last one began.
    """

    def __init__(self, cycle_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0,
                 cycles: int | None = None, total_steps: int | None = None):
        if cycle_steps < 1:
            raise ValueError(f"cycle_steps must be >= 1, got {cycle_steps}")
        if (cycles is None) != (total_steps is None):
            raise ValueError("cycles and total_steps go together")
        self.cycle_steps, self.warmup_steps, self.min_ratio = cycle_steps, warmup_steps, min_ratio
        self.cycles, self.total_steps = cycles, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        offset, length = step - self.warmup_steps, self.cycle_steps
        last_start = (self.cycles - 1) * self.cycle_steps if self.cycles is not None else None
        if last_start is not None and offset >= last_start:
            offset -= last_start
            length = max(length, self.total_steps - self.warmup_steps - last_start)
        else:
            offset %= self.cycle_steps
        position = min(offset / length, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * position))
