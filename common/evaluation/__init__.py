"""Evaluation: TREC conventions, re-ranking a topic set, cost (MACs, latency), the results store, figures."""
