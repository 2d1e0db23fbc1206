#!/usr/bin/env python
"""How close an exported model's int8 ranking stays to its own fp32 ranking, on training-side queries.

For each MODEL dir (exported by ``04_reshape.py --onnx``), scores the candidates of QUERIES
training-side queries of a distillation set (not its held-out topics; no labels are read) with the
onnxruntime fp32 graph and with the int8 graph, and prints the mean per-query Kendall tau between
the two and the mean overlap of their top 10. This is how the int8 recipe of
``common.serving.onnx_export`` is chosen: never on an evaluation topic set.

  python bench/int8_fidelity.py runs/int8/cross_recovered_plain runs/int8/cross_recovered_smooth --queries 20 --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, as bench/speedup.py

from common.cli import fail, positive_int
from common.serving.rank import Ranker


def fidelity(reference: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """Mean per-group Kendall tau and top-10 overlap of ``scores`` against ``reference``."""
    taus, overlaps = [], []
    for group in np.unique(groups):
        ref, got = reference[groups == group], scores[groups == group]
        taus.append(kendalltau(ref, got)[0])
        k = min(10, len(ref))
        overlaps.append(len(set(np.argsort(-ref)[:k]) & set(np.argsort(-got)[:k])) / k)
    return float(np.mean(taus)), float(np.mean(overlaps))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="exported model dirs (onnx/model.onnx + model_int8.onnx)")
    p.add_argument("--distill_set", default="data/distill",
                   help="candidates.parquet and holdout.candidates.parquet of a distillation set")
    p.add_argument("--queries", type=positive_int, default=20)
    p.add_argument("--max_length", type=positive_int, default=128)
    p.add_argument("--threads", type=positive_int)
    args = p.parse_args(argv)
    try:
        cands = pd.read_parquet(f"{args.distill_set}/candidates.parquet", columns=["qid", "query", "passage"])
        held = set(pd.read_parquet(f"{args.distill_set}/holdout.candidates.parquet", columns=["qid"]).qid)
        qids = [q for q in cands.qid.unique() if q not in held]
        qids = qids[::max(1, len(qids) // args.queries)][:args.queries]  # spread over the set
        sub = cands[cands.qid.isin(qids)]
        queries, passages, groups = sub["query"].tolist(), sub["passage"].tolist(), sub["qid"].to_numpy()
        print(f"{len(qids)} training-side queries of {args.distill_set}, {len(sub)} pairs, "
              f"{args.max_length} tokens; int8 vs the same model's onnxruntime fp32")
        for model in args.models:
            ref = Ranker.load(model, "onnx", max_length=args.max_length, threads=args.threads).score(queries, passages)
            got = Ranker.load(model, "onnx-int8", max_length=args.max_length, threads=args.threads).score(queries, passages)
            tau, top = fidelity(ref, got, groups)
            print(f"{model}: Kendall tau {tau:.4f}, top-10 overlap {top:.3f}")
    except (ValueError, OSError) as err:
        fail(err)


if __name__ == "__main__":
    main()
