#!/usr/bin/env python
"""Step 6: figures from the training logs and the results store.

Reads RUNS_DIR/*/metrics.jsonl and the results parquet; writes, per format,
  pruning_lr_schedule           LR over seen pairs of the pruning runs, prune events marked
  performance_vs_seen_pairs     NDCG@10 over seen pairs, one line per run, a panel per topic set
  performance_vs_removed_flops  NDCG@10 vs. share of multiply-adds removed, a marker per method
  ndcg_vs_latency               NDCG@10 vs. CPU ms per query, with the Pareto frontier
Figures whose data is absent are skipped with a note; existing figures are replaced atomically.

  python 06_plots.py --runs_dir runs --results runs/results.parquet --out_dir figures
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")

from common.evaluation.plots import FORMATS, make_all  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs_dir", default="runs", help="every subdirectory with a metrics.jsonl")
    p.add_argument("--results", default="runs/results.parquet")
    p.add_argument("--out_dir", default="figures")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), help="e.g. png svg pdf")
    args = p.parse_args(argv)
    written = make_all(args.runs_dir, args.results, args.out_dir, args.formats)
    for path in written:
        print(path)
    if not written:
        print("no figures written")


if __name__ == "__main__":
    main()
