#!/usr/bin/env python
"""A latency table of one backend on this host: the time of one layer over a grid of (heads,
FFN width), at the given lengths and threads, and of the reference model whole, saved as json
with the host description (``common.evaluation.latency``: the format, and the predictor that
reads it). Each grid point is the reference's first layer alone, reshaped to that many heads
and neurons, between its embeddings and head, on batches of --batch sequences of each length;
the (0, 0) point is the base every layer's cost is measured over.

  python bench/latency_table.py --model all-MiniLM-L6-v2 --model_kind cross --backend openvino \
      --lengths 64 128 --threads 2 --out results/latency/openvino_epyc.json

openvino-int8 calibrates every grid point's IR with 04's recipe (NNCF static, transformer preset) on
the first --calibration_pairs pairs of --calibration_triples (training-side triples; DL20's queries are
refused), truncated to 64 tokens: the activation ranges depend on them, the timed graph does not.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import positive_int  # noqa: E402
from common.evaluation.latency import TABLE_BACKENDS, measure_table  # noqa: E402
from common.io import atomic_write_text  # noqa: E402
from common.kinds import KINDS  # noqa: E402
from common.serving.onnx_export import FP32_ROLES  # noqa: E402


def grid(top: int, steps: int) -> list[int]:
    """0 .. top in ``steps`` even steps (rounded, distinct)."""
    return sorted({round(top * i / steps) for i in range(steps + 1)})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the reference model dir or tag (its widths bound the grid)")
    p.add_argument("--model_kind", choices=list(KINDS), help="for a plain model dir or tag")
    p.add_argument("--backend", required=True, choices=TABLE_BACKENDS)
    p.add_argument("--heads", type=int, nargs="+", help="head counts (default: 0 .. all in 4 steps)")
    p.add_argument("--ffn", type=int, nargs="+", help="FFN widths (default: 0 .. all in 4 steps)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[128], help="tokens per sequence")
    p.add_argument("--batch", type=positive_int, default=100, help="sequences per batch (candidates per query)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--rounds", type=positive_int, default=5, help="timed batches per point (the median)")
    p.add_argument("--int8_keep_fp32", nargs="+", choices=FP32_ROLES, default=[], metavar="ROLE",
                   help="onnx-int8: leave these projections of every layer in fp32, as the shipped export "
                        "does (04_reshape.py --int8_keep_fp32, e.g. ffn_out)")
    p.add_argument("--calibration_triples", help="openvino-int8: training-side triples to calibrate on")
    p.add_argument("--calibration_pairs", type=positive_int, default=64,
                   help="openvino-int8: pairs calibrated on (query + each passage of the first triples)")
    p.add_argument("--out", required=True, help="the table (json)")
    args = p.parse_args(argv)
    for flag in ("heads", "ffn"):
        values = getattr(args, flag)
        if values is not None and (values[0] != 0 or sorted(set(values)) != values):
            p.error(f"--{flag} must be increasing and start at 0 (the base of every layer's cost)")
    if args.int8_keep_fp32 and args.backend != "onnx-int8":
        p.error(f"--int8_keep_fp32 shapes onnx-int8 graphs; --backend is {args.backend}")
    if (args.backend == "openvino-int8") != bool(args.calibration_triples):
        p.error("--calibration_triples goes with --backend openvino-int8, and it needs them")
    if sorted(set(args.lengths)) != args.lengths:
        p.error("--lengths must be increasing")
    try:
        from common.evaluation.latency import cut_model

        calibration = None
        if args.calibration_triples:  # training-side pairs: DL20's queries are refused
            from common.data.triples import calibration_pairs

            calibration, _ = calibration_pairs(args.calibration_triples, args.calibration_pairs)
        first = cut_model(args.model, args.model_kind).state
        heads = args.heads or grid(len(first.present_heads[0]), 4)
        ffn = args.ffn or grid(len(first.present_ffn[0]), 4)
        table = measure_table(args.model, args.model_kind, args.backend, heads, ffn, args.lengths,
                              args.batch, args.rounds, args.threads, keep_fp32=tuple(args.int8_keep_fp32),
                              calibration=calibration)
        if args.calibration_triples:
            table["calibration_file"] = args.calibration_triples
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}")
    atomic_write_text(args.out, json.dumps(table, indent=1))
    ratios = [m / p for m, p in zip(table["whole_model_ms"], table["predicted_whole_model_ms"])]
    print(f"wrote {args.out} ({table['host']}); whole model measured / additive prediction: "
          + ", ".join(f"{r:.2f} @ {n}" for r, n in zip(ratios, args.lengths))
          + " (the gap is the fixed cost every prediction adds: common.evaluation.latency.residual_ms)")


if __name__ == "__main__":
    main()
