#!/usr/bin/env python
"""Speed-up of one (model, backend) over another, measured in one process.

Both score the same inputs, alternating A, B, A, B ... so that machine load hits both alike;
prints each one's mean ± std per query and the ratio of means with the spread of the per-round
ratios. This is how speed claims in this project are made (no timed tests). A model is
``PATH`` (torch fp32) or ``PATH@BACKEND`` with a backend of ``common.serving.rank`` (``torch-bf16``,
``onnx``, ``onnx-int8``: the ONNX files of ``04_reshape.py --onnx``; ``openvino``,
``openvino-int8``: the IR of ``04_reshape.py --openvino``, its precision on this host printed).
``--candidate`` may be given more than once: every round then runs the baseline and each
candidate in turn, and each candidate's speed-up over the baseline is printed.

  python bench/speedup.py --baseline runs/main/initial/seen_000002560 \
      --candidate runs/main/mixed/seen_000004160_heads_048_ffn_04608/reshaped \
      --candidates data/dl20.bm25.candidates.parquet --rounds 10
  python bench/speedup.py --baseline runs/main/final@torch --candidate runs/main/final@onnx-int8 ...
  python bench/speedup.py --baseline DIR@torch --candidate DIR@torch-bf16 --candidate DIR@openvino ...
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.evaluation.cost import worst_case_inputs  # noqa: E402
from common.evaluation.latency import load_table, predicted_speedup  # noqa: E402
from common.hardware import machine_description  # noqa: E402
from common.kinds import KINDS  # noqa: E402
from common.data.formats import read_candidates  # noqa: E402
from common.serving.rank import Ranker, describe_backend  # noqa: E402
from common.serving.runners import BACKENDS


def model_and_backend(spec: str) -> tuple[str, str]:
    """``PATH`` or ``PATH@BACKEND`` -> (path, backend)."""
    path, at, backend = spec.rpartition("@")
    if at and backend in BACKENDS:
        return path, backend
    if at and not Path(spec).exists():
        raise SystemExit(f"error: {spec}: backend {backend!r} is not one of {BACKENDS}")
    return spec, "torch"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="PATH or PATH@BACKEND")
    p.add_argument("--candidate", required=True, action="append",
                   help="PATH or PATH@BACKEND; more than once: each one against the baseline")
    p.add_argument("--candidates", help="candidates parquet: real lengths (100 per query); "
                                        "without it, worst-case synthetic pairs")
    p.add_argument("--queries", type=int, default=5, help="queries per round (real lengths)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--threads", type=int)
    p.add_argument("--encode", action="store_true",
                   help="bi-encoders: time encoding the candidate passages (what indexing pays)")
    p.add_argument("--model_kind", choices=list(KINDS), help="for plain model dirs or tags")
    p.add_argument("--latency_table", help="a table of bench/latency_table.py: print each candidate's predicted "
                   "speed-up (at --max_length tokens) and measured / predicted (the serving issue asks >= 0.9)")
    args = p.parse_args(argv)
    if args.rounds < 2 or args.queries < 1:
        p.error("--rounds must be >= 2 (a spread needs two) and --queries >= 1")
    table = None
    if args.latency_table:
        try:
            table = load_table(args.latency_table)
        except ValueError as err:
            raise SystemExit(f"error: --latency_table: {err}")
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    names = ["candidate"] if len(args.candidate) == 1 else [f"cand{i + 1}" for i in range(len(args.candidate))]
    for name, spec in (("baseline", args.baseline), *zip(names, args.candidate)):
        path, backend = model_and_backend(spec)
        try:
            models[name] = Ranker.load(path, backend, max_length=args.max_length,
                                       batch_size=64 if args.encode else 100, kind=args.model_kind)
        except ValueError as err:
            raise SystemExit(f"error: {err}")
    if args.encode:
        texts = list(dict.fromkeys(read_candidates(args.candidates)["passage"]))[:100 * args.queries]

        def work(ranker):
            ranker.encode(texts)
        per = len(texts) / 1000  # -> ms per 1000 passages
    elif args.candidates:
        cands = read_candidates(args.candidates)
        groups = [g.head(100) for _, g in cands.groupby("qid", sort=False)][:args.queries]

        def work(ranker):
            for g in groups:
                ranker.score(g["query"].tolist(), g["passage"].tolist())
        per = len(groups)
    else:
        batch = worst_case_inputs(models["baseline"].tokenizer, n_pairs=100, max_length=args.max_length)

        def work(ranker):
            ranker.run({k: v for k, v in batch.items() if k in getattr(ranker.runner, "inputs", batch)})
        per = 1
    times = {name: [] for name in models}
    for name, loaded in models.items():  # warm-up
        work(loaded)
    for _ in range(args.rounds):
        for name, loaded in models.items():
            start = time.perf_counter()
            work(loaded)
            times[name].append((time.perf_counter() - start) * 1000 / per)
    print(machine_description())
    if args.encode:
        regime, unit = f"encoding {len(texts)} distinct candidate passages", "ms/1000 passages"
    elif args.candidates:
        regime, unit = f"real lengths, {per} queries x 100 candidates", "ms/query"
    else:
        regime, unit = f"worst case, 100 pairs x {args.max_length} tokens", "ms/query"
    print(f"regime: {regime}; {args.rounds} alternating rounds")
    for name in models:
        info = describe_backend(models[name].loaded.path, models[name].backend)
        precision = f", {info['backend_precision']}" if "backend_precision" in info else ""
        print(f"{name:9s} {statistics.mean(times[name]):9.1f} ± {statistics.stdev(times[name]):6.1f} "
              f"{unit}  ({models[name].loaded.path} @ {models[name].backend}{precision})")
    for name in names:
        ratios = [b / c for b, c in zip(times["baseline"], times[name])]
        label = "speed-up" if len(names) == 1 else f"{name} x"
        print(f"{label:9s} {statistics.mean(times['baseline']) / statistics.mean(times[name]):.2f}x "
              f"(per-round ratios: median {statistics.median(ratios):.2f}, min {min(ratios):.2f}, "
              f"max {max(ratios):.2f})")
        if table is not None:
            shape = {n: (models[n].loaded.state.heads_per_layer, models[n].loaded.state.ffn_per_layer)
                     for n in ("baseline", name)}
            predicted = predicted_speedup(table, shape["baseline"], shape[name], args.max_length)
            measured = statistics.mean(times["baseline"]) / statistics.mean(times[name])
            backends = {models[n].backend for n in ("baseline", name)}
            same = "" if backends == {table["backend"]} else \
                f"; not comparable: the table is of backend {table['backend']}, these run on {', '.join(sorted(backends))}"
            print(f"{'predicted':9s} {predicted:.2f}x (latency table {args.latency_table}, at {args.max_length} "
                  f"tokens{same}); measured / predicted {measured / predicted:.2f}")


if __name__ == "__main__":
    main()
