"""Training: argument checks, the one loop with its callbacks, losses, LR schedules, layer-wise distillation."""
