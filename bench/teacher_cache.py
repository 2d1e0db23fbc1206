#!/usr/bin/env python
"""Bi-encoder distillation pairs/s with and without --cache_teacher, in one run.

Each setting trains one short 02 stage of --model (a bi-encoder checkpoint, e.g. a pruned and
reshaped one) distilling --teacher's embeddings (the matched-cost recipe's loss: --distill_target
embeddings, --contrastive_weight 0) on the first --pairs pairs of --triples. The settings alternate
over --rounds (each stage in its own temporary dir) so that a machine's drift hits both alike.
Printed per setting: the steps' pairs/s (common.training.resume.training_throughput: the first
step and checkpoint writes left out), the seconds the cache took to fill (the teacher_cache
event), and the stage's pairs/s counting them (what a stage of --pairs pairs gains; a longer
stage amortises the cache further). Quality is not measured here (tests/test_teacher_cache.py:
the same training up to rounding).

  PYTHONPATH=. python bench/teacher_cache.py --model runs/x/prune/seen_.../reshaped \
      --triples data/augment/mix_all/triples.tsv --pairs 2048 --threads 2 --precision bf16 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from common.cli import fail, positive_int
from common.data.formats import DataError
from common.layout import METRICS_FILE
from common.training.loop import TrainArgs, Trainer
from common.training.resume import training_throughput
from common.training.schedules import WarmupLinear


def one_stage(args, cached: bool, out: Path) -> tuple[float, float, float]:
    """(steps' pairs/s, cache seconds, the stage's pairs/s with the cache's seconds counted)."""
    train = TrainArgs(train_triples_file=args.triples, output_dir=str(out), num_training_samples=args.pairs,
                      checkpoint_dir=args.model, model_kind="bi", distill_from=args.teacher,
                      distill_target="embeddings", contrastive_weight=0.0, batch_size=args.batch_size,
                      max_length=args.max_length, precision=args.precision, threads=args.threads,
                      seed=args.seed, learning_rate=5e-5, group_by_length=args.group_by_length,
                      cache_teacher=cached)
    Trainer(train, "recover", lambda t: WarmupLinear(t.total_steps, 0)).train()
    rate = training_throughput(out)["pairs/s"]
    events = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    cache = sum(e["seconds"] for e in events if e["event"] == "teacher_cache")
    return rate, cache, args.pairs / (args.pairs / rate + cache)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the student: a bi-encoder checkpoint (dir or tag)")
    p.add_argument("--teacher", default="all-MiniLM-L6-v2", help="the frozen teacher (default: the packaged encoder)")
    p.add_argument("--triples", required=True, help="query<TAB>positive<TAB>negative (plain or .gz)")
    p.add_argument("--pairs", type=positive_int, default=1024, help="pairs per stage (a multiple of --batch_size)")
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--max_length", type=positive_int, default=128)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--group_by_length", action="store_true", help="both settings with --group_by_length")
    args = p.parse_args(argv)
    if args.pairs % args.batch_size or args.batch_size % 2 or args.pairs < 2 * args.batch_size:
        p.error("--pairs must be a multiple of the (even) --batch_size, at least two batches")
    results: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for cached in (False, True):
                    results[cached].append(one_stage(args, cached, Path(tmp) / f"{r}_{int(cached)}"))
    except (DataError, ValueError, OSError) as err:
        fail(err)
    print(f"a 02 stage of {args.model} distilling {args.teacher}'s embeddings: {args.pairs} pairs per stage, "
          f"batch {args.batch_size}, max_length {args.max_length}, precision {args.precision}"
          f"{', group_by_length' if args.group_by_length else ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} alternating round(s)")
    base = statistics.median(x[0] for x in results[False])
    for cached in (False, True):
        rates = [x[0] for x in results[cached]]
        median = statistics.median(rates)
        stage = statistics.median(x[2] for x in results[cached])
        cache = statistics.median(x[1] for x in results[cached])
        name = "--cache_teacher" if cached else "teacher per step"
        print(f"{name:<16}: steps' pairs/s " + " ".join(f"{x:.1f}" for x in rates)
              + f" (median {median:.1f}; {median / base:.2f}x); cache {cache:.2f} s; "
              f"the stage with it {stage:.1f} pairs/s ({stage / base:.2f}x)")


if __name__ == "__main__":
    main()
