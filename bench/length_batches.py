#!/usr/bin/env python
"""Training pairs/s with and without --group_by_length, on a small sample of a training file.

For each setting: the share of the tokens of the batches that is padding (the tokenizer on the
exact batches a stage would train, over --padding_pairs, padded as the stage pads them: grouped
batches in chunks of LENGTH_CHUNK sequences of similar length; no model run), then a short 02 stage (Trainer) whose
pairs/s come from its metrics.jsonl (common.training.resume.training_throughput: the first step
left out). The two stages alternate over --rounds, each in its own temporary output dir, so
that a machine's drift hits both alike. Quality is not measured here.

  python bench/length_batches.py --triples gpu_data/dl21.triples.tsv.gz --pairs 256 \
      --max_length 128 --device cpu --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from common.cli import fail, positive_int
from common.data.formats import DataError, TrainingBatches
from common.kinds import CrossKind
from common.models.loading import encode_pairs
from common.kinds.loading import load_model
from common.training.loop import LENGTH_CHUNK, TrainArgs, Trainer
from common.training.resume import training_throughput
from common.training.schedules import WarmupLinear


def padding_share(args, grouped: bool) -> float:
    """Padded / all tokens over the first batches of ``args.padding_pairs`` pairs (cross-encoder
    layout; whole windows of --group_by_length give its real effect)."""
    tokenizer = load_model(args.model, "cpu", kind=CrossKind.name).tokenizer
    rows_per_batch = args.batch_size // 2
    batches = TrainingBatches(args.triples, start_row=0, rows_per_batch=rows_per_batch,
                              group_by_length=grouped, seed=args.seed)
    real = padded = 0
    for _, batch in zip(range(args.padding_pairs // args.batch_size), batches):
        queries = [row[0] for _, row in batch for _ in range(2)]
        passages = [p for _, row in batch for p in row[1:]]
        lengths = encode_pairs(tokenizer, queries, passages, args.max_length)["attention_mask"].sum(dim=1)
        chunks = lengths.sort().values.split(LENGTH_CHUNK) if grouped else [lengths]
        real += int(lengths.sum())
        padded += sum(int(c.max()) * len(c) for c in chunks)
    return 1 - real / padded


def one_stage(args, grouped: bool, out: Path) -> float:
    train = TrainArgs(train_triples_file=args.triples, output_dir=str(out), num_training_samples=args.pairs,
                      model_tag=args.model, batch_size=args.batch_size, max_length=args.max_length,
                      device=args.device, precision=args.precision, threads=args.threads, seed=args.seed,
                      group_by_length=grouped, learning_rate=3e-5, head=args.head)
    Trainer(train, "initial", lambda t: WarmupLinear(t.total_steps, 0)).train()
    return training_throughput(out)["pairs/s"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triples", required=True, help="query<TAB>positive<TAB>negative (plain or .gz)")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--head", help="the cross-encoder head (default: the model's; the main job: segment_cosine)")
    p.add_argument("--pairs", type=positive_int, default=256, help="pairs per stage (a multiple of --batch_size)")
    p.add_argument("--padding_pairs", type=positive_int, default=2048,
                   help="pairs the padding share is measured on (tokenizer only)")
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--max_length", type=positive_int, default=128)
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    if args.pairs % args.batch_size or args.batch_size % 2 or args.pairs < 2 * args.batch_size:
        p.error("--pairs must be a multiple of the (even) --batch_size, at least two batches")
    try:
        shares = {g: padding_share(args, g) for g in (False, True)}
        rates: dict[bool, list[float]] = {False: [], True: []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for grouped in (False, True):
                    rates[grouped].append(one_stage(args, grouped, Path(tmp) / f"{r}_{int(grouped)}"))
    except (DataError, ValueError, OSError) as err:
        fail(err)
    print(f"{args.pairs} pairs per stage, batch {args.batch_size}, max_length {args.max_length}, "
          f"{args.device} {args.precision}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for grouped in (False, True):
        name = "group_by_length" if grouped else "file order     "
        print(f"{name}: padding {shares[grouped]:6.1%} of the tokens; pairs/s "
              + " ".join(f"{x:.1f}" for x in rates[grouped]) + f" (median {statistics.median(rates[grouped]):.1f})")
    speedup = statistics.median(rates[True]) / statistics.median(rates[False])
    print(f"speed-up: {speedup:.2f}x")


if __name__ == "__main__":
    main()
