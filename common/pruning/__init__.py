"""Pruning policy (what to cut): importance scorers, prune cycles, L0 gates, L3Prune layer choice."""
