#!/usr/bin/env python
"""Step 5: evaluate checkpoints on TREC DL topics: quality, latency, FLOPs, parameters.

Re-ranks a candidates parquet (batched, length-sorted, no grad), writes a TREC run and
per-query measures (CHECKPOINT/eval/), and appends one row per (checkpoint, topics) to the
results parquet; then regenerates the markdown table from it. Measures: NDCG@10 over all
grades; MAP@100, RR@10, R@100 with grade >= 2 relevant; judged queries absent from a run
score 0 (trec_eval -c).

  python 05_eval_trec.py --checkpoint runs/initial/seen_000006000 \
      --candidates data/dl20.bm25.candidates.parquet --qrels ../shared/data/trec-dl/dl20/qrels.txt \
      --topics dl20 --results runs/results.parquet --table runs/results.md
  python 05_eval_trec.py --first_stage bm25 ...          # the candidates' own ranking
  python 05_eval_trec.py --all_checkpoints runs/mixed ... # every checkpoint not yet evaluated
  python 05_eval_trec.py --checkpoint all-MiniLM-L6-v2 --model_kind bi --interpolate 0.3 0.5 ...
                                                         # + BM25 score interpolation rows
  python 05_eval_trec.py --checkpoint runs/main/final --backend onnx-int8 ...
                                                         # quality and latency of the int8 export
"""
from __future__ import annotations

import argparse

import torch

from common.cli import fail, nonneg_int, parse_args, positive_int, unit_float
from common.data.formats import DataError
from common.kinds import KINDS
from common.io import check_writable, refuse_inputs
from common.serving.rank import AUTO, resolve_backend
from common.serving.runners import BACKENDS
from common.evaluation.rerank import CostOptions, checkpoints_of, evaluate_first_stage, evaluate_model, result_key
from common.evaluation.results import append_results, has_result, load_results, write_table


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", nargs="+", help="checkpoint dir(s), packaged tag or hub name")
    what.add_argument("--all_checkpoints", metavar="RUN_DIR", nargs="+",
                      help="every checkpoint of these run dirs, skipping ones already evaluated")
    what.add_argument("--first_stage", metavar="NAME", help="evaluate the candidates' first-stage ranking")
    p.add_argument("--candidates", required=True)
    p.add_argument("--qrels", required=True)
    p.add_argument("--topics", required=True, help="topic-set name in the results, e.g. dl20")
    p.add_argument("--results", default="runs/results.parquet")
    p.add_argument("--table", default="runs/results.md", help="markdown table regenerated from the results")
    p.add_argument("--max_length", type=positive_int, default=256)
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default=AUTO, choices=(AUTO, *BACKENDS),
                   help="what scores and is timed (common.serving.rank): torch fp32, torch under bf16/fp16 "
                        "autocast, onnxruntime on the fp32 / int8 export of 04_reshape.py --onnx, or OpenVINO "
                        "on the IR / int8 IR of 04_reshape.py --openvino; auto (default): for a model dir with "
                        "an export the backend measured fastest on this host class (common.serving.choose, "
                        "cached in the dir), else torch. "
                        "Every row states its backend; rows other than torch are keyed CHECKPOINT@BACKEND")
    p.add_argument("--no_costs", action="store_true", help="quality only")
    p.add_argument("--no_latency", action="store_true", help="FLOPs and parameters, no timing")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--warmup", type=nonneg_int, default=1)
    p.add_argument("--latency_queries", type=positive_int, default=10)
    p.add_argument("--bf16_latency", action="store_true", help="also time bf16 autocast")
    p.add_argument("--threads", type=positive_int, help="torch threads for scoring and latency (default: torch's)")
    p.add_argument("--interpolate", type=unit_float, nargs="+", default=[], metavar="WEIGHT",
                   help="also evaluate weight*minmax(model) + (1-weight)*minmax(first stage) per query "
                        "(quality-only rows, method 'interpolate')")
    p.add_argument("--query_encoder", metavar="MODEL",
                   help="bi-encoders: embed the queries with this encoder (tag, hub name or path; "
                        "e.g. the unpruned model beside a pruned passage encoder); rows are keyed "
                        "<checkpoint>+queries:<MODEL>")
    p.add_argument("--model_kind", choices=list(KINDS),
                   help="for a plain model dir or tag (our checkpoints know their kind)")
    args = parse_args(p, argv)
    if args.query_encoder is not None and (args.first_stage or not args.query_encoder.strip()):
        p.error("--query_encoder names the model that embeds a bi-encoder's queries "
                + ("(not for --first_stage)" if args.first_stage else "(got an empty name)"))
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = {"--candidates": args.candidates, "--qrels": args.qrels, "--query_encoder": args.query_encoder,
              **{"--checkpoint": c for c in args.checkpoint or []}, **{"--all_checkpoints": r for r in args.all_checkpoints or []}}
    try:  # an output that is an input (or the other output), or unwritable, is refused before anything runs
        refuse_inputs({"--results": args.results}, inputs)
        refuse_inputs({"--table": args.table}, {**inputs, "--results": args.results})
        check_writable(args.results, "--results")
        check_writable(args.table, "--table")
    except (ValueError, OSError) as err:
        fail(err)

    try:
        if args.first_stage:
            rows = [evaluate_first_stage(args.candidates, args.qrels, args.topics, args.first_stage)]
        else:
            targets = args.checkpoint or [
                str(c) for run in args.all_checkpoints for c in checkpoints_of(run)
                if not has_result(args.results, result_key(c, resolve_backend(c, args.backend), args.query_encoder),
                                  args.topics)]
            costs = None if args.no_costs else CostOptions(
                latency=not args.no_latency, repeats=args.repeats, warmup=args.warmup,
                latency_queries=args.latency_queries, bf16=args.bf16_latency)
            rows = []
            for target in targets:
                found = evaluate_model(target, args.candidates, args.qrels, args.topics,
                                       max_length=args.max_length, batch_size=args.batch_size,
                                       device=args.device, backend=args.backend, costs=costs,
                                       kind=args.model_kind, interpolate_weights=tuple(args.interpolate),
                                       query_encoder=args.query_encoder)
                append_results(args.results, found)  # one at a time: a long sweep keeps its rows
                rows.extend(found)
        if args.first_stage:
            append_results(args.results, rows)
    except (DataError, ValueError, OSError) as err:
        fail(err)
    for row in rows:
        print(f"{row['checkpoint']} [{args.topics}] " + "  ".join(
            f"{m}={row[m]:.4f}" for m in ("ndcg@10", "map@100", "rr@10", "recall@100"))
            + f"  (means over {row['num_queries']} judged queries; the run has {row['run_queries']} "
              f"queries, {row['judged_run_queries']} of them judged)")
    try:
        write_table(load_results(args.results), args.table)
    except (ValueError, OSError) as err:
        fail(err)
    print(f"results: {args.results}; table: {args.table}")


if __name__ == "__main__":
    main()
