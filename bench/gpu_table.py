#!/usr/bin/env python
"""The results table of bench/gpu_check.sh: latency per query of 100 candidates (fp32 and bf16
autocast, unpruned vs pruned) from 05's results parquet, and training pairs/s of each stage
from its metrics.jsonl.

Training throughput: common.training.loop.training_throughput (the first step left out).

  python bench/gpu_table.py --results OUT/results.parquet --runs RUN/initial RUN/mixed \
      --output OUT/gpu_results.md --metrics_out OUT/train_metrics.jsonl
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from common import layout
from common.cli import fail
from common.data.formats import DataError
from common.io import atomic_write_text
from common.training.resume import training_throughput


def latency_rows(results: pd.DataFrame) -> list[dict]:
    rows = []
    for _, r in results[results["method"] != "bm25"].iterrows():
        prefix = "gpu" if pd.notna(r.get("gpu_ms_worst", float("nan"))) else "cpu"
        cell = lambda c: round(float(r[c]), 2) if c in r and pd.notna(r[c]) else None  # noqa: E731
        rows.append({"model": r["run"], "heads": int(r["heads"]), "ffn": int(r["ffn"]),
                     "DL20 NDCG@10": round(float(r["ndcg@10"]), 4),
                     "GMACs/query": round(float(r["flops_macs"]) / 1e9, 1) if pd.notna(r.get("flops_macs")) else None,
                     f"{prefix} fp32 ms worst": cell(f"{prefix}_ms_worst"), f"{prefix} fp32 ms real": cell(f"{prefix}_ms_real"),
                     f"{prefix} bf16 ms worst": cell(f"{prefix}_bf16_ms_worst"),
                     f"{prefix} bf16 ms real": cell(f"{prefix}_bf16_ms_real"), "machine": r.get("machine")})
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", required=True, help="05's results parquet")
    p.add_argument("--runs", nargs="+", required=True, help="training run dirs (metrics.jsonl)")
    p.add_argument("--output", required=True, help="markdown table")
    p.add_argument("--metrics_out", help="also write every run's metrics.jsonl lines into one file")
    args = p.parse_args(argv)
    try:
        results = pd.read_parquet(args.results)
        machines = sorted({str(m) for m in results.get("machine", pd.Series(dtype=str)).dropna()})
        training = [training_throughput(Path(r)) for r in args.runs]
    except (DataError, OSError, ValueError, KeyError) as err:
        fail(err)
    latency = latency_rows(results)
    for row in latency:
        row.pop("machine")
    text = ("## Latency per query of 100 candidates (05: worst = every pair max_length tokens; "
            "real = the first DL20 queries' own candidates, tokenisation included)\n\n" + markdown(latency)
            + "\n## Training throughput\n\n" + markdown(training)
            + "\nMachine: " + ("; ".join(machines) or "?") + "\n")
    atomic_write_text(Path(args.output), text)
    if args.metrics_out:
        lines = [line for r in args.runs for line in (Path(r) / layout.METRICS_FILE).read_text().splitlines()]
        atomic_write_text(Path(args.metrics_out), "".join(line + "\n" for line in lines))
    print(text)


if __name__ == "__main__":
    main()
