#!/usr/bin/env python
"""Training pairs/s with and without --group_by_length, on a small sample of a training file.

For each setting (file order; --group_by_length with each of --chunks, the sequences per
length-sorted forward chunk, LENGTH_CHUNK by default): the share of the tokens of the batches that
is padding (the tokenizer on the exact batches a stage would train, over --padding_pairs, padded as
the stage pads them; no model run), then a short stage whose pairs/s come from its metrics.jsonl
(common.training.resume.training_throughput: the first step and checkpoint writes left out). By
default a plain 02 stage (Trainer); with --stage SCRIPT the real script runs in-process with
--stage_args (a stage of a recipe: its --config, start model, teacher), the bench adding
--train_triples_file, --num_training_samples, --output_dir, --max_length, --seed, --batch_size
(over a config's: the padding is measured at the bench's), --group_by_length true|false, and
--threads / --precision where given (so --stage_args may repeat none of them). The
settings alternate over --rounds, each in its own temporary output dir, so that a machine's drift
hits all alike. Quality is not measured here.

  python bench/length_batches.py --triples gpu_data/dl21.triples.tsv.gz --pairs 256 \
      --max_length 128 --device cpu --threads 2
  python bench/length_batches.py --triples data/distill_fused/triples.tsv --pairs 1024 --threads 2 \
      --rounds 2 --chunks 16 8 --stage 03c_prune_mixed.py --stage_args "initial --config \
      recipes/config/main/prune.toml --checkpoint_dir M --distill_from M"
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import statistics
import tempfile
from pathlib import Path

import torch

from common.cli import fail, positive_int
from common.data.formats import DataError, TrainingBatches
from common.kinds import CrossKind
from common.models.loading import encode_pairs
from common.kinds.loading import load_model
import common.training.loop as loop
from common.training.loop import LENGTH_CHUNK, TrainArgs, Trainer
from common.training.resume import training_throughput
from common.training.schedules import WarmupLinear


def padding_share(args, grouped: bool, chunk: int = LENGTH_CHUNK) -> float:
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
        chunks = lengths.sort().values.split(chunk) if grouped else [lengths]
        real += int(lengths.sum())
        padded += sum(int(c.max()) * len(c) for c in chunks)
    return 1 - real / padded


def one_stage(args, chunk: int, out: Path) -> float:
    """One stage's pairs/s: file order (``chunk`` 0) or --group_by_length in chunks of ``chunk``."""
    grouped = chunk > 0
    loop.LENGTH_CHUNK = chunk or LENGTH_CHUNK  # what the Trainer reads when it sets up the stage's kind
    try:
        if args.stage:
            argv = [*shlex.split(args.stage_args), "--train_triples_file", args.triples, "--output_dir", str(out),
                    "--num_training_samples", str(args.pairs), "--max_length", str(args.max_length),
                    "--seed", str(args.seed), "--batch_size", str(args.batch_size),
                    *(["--threads", str(args.threads)] if args.threads else []),
                    *(["--precision", args.precision] if args.precision else []),
                    "--group_by_length", "true" if grouped else "false"]
            importlib.import_module(Path(args.stage).stem).main(argv)
        else:
            train = TrainArgs(train_triples_file=args.triples, output_dir=str(out), num_training_samples=args.pairs,
                              model_tag=args.model, batch_size=args.batch_size, max_length=args.max_length,
                              device=args.device, precision=args.precision or "fp32", threads=args.threads, seed=args.seed,
                              group_by_length=grouped, learning_rate=3e-5, head=args.head)
            Trainer(train, "initial", lambda t: WarmupLinear(t.total_steps, 0)).train()
    finally:
        loop.LENGTH_CHUNK = LENGTH_CHUNK
    return training_throughput(out)["pairs/s"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triples", required=True, help="query<TAB>positive<TAB>negative (plain or .gz)")
    p.add_argument("--model", default="all-MiniLM-L6-v2",
                   help="the plain stage's model; its tokenizer measures the padding (with --stage: the stage's start model)")
    p.add_argument("--head", help="the cross-encoder head (default: the model's; the main job: segment_cosine)")
    p.add_argument("--pairs", type=positive_int, default=256, help="pairs per stage (a multiple of --batch_size)")
    p.add_argument("--padding_pairs", type=positive_int, default=2048,
                   help="pairs the padding share is measured on (tokenizer only)")
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--max_length", type=positive_int, default=128)
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", help="fp32 (default) or bf16; with --stage, its config's unless given")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--chunks", type=positive_int, nargs="+", default=[LENGTH_CHUNK],
                   help=f"sequences per length-sorted forward chunk, one grouped setting each (default {LENGTH_CHUNK})")
    p.add_argument("--stage", choices=["02_train_initial.py", "03c_prune_mixed.py"],
                   help="run this script's stage (with --stage_args) instead of a plain 02 stage")
    p.add_argument("--stage_args", default="", help="the stage's own arguments, one string (with --stage)")
    args = p.parse_args(argv)
    if args.stage_args and not args.stage:
        p.error("--stage_args goes with --stage")
    if args.pairs % args.batch_size or args.batch_size % 2 or args.pairs < 2 * args.batch_size:
        p.error("--pairs must be a multiple of the (even) --batch_size, at least two batches")
    settings = [0, *dict.fromkeys(args.chunks)]  # 0: file order
    try:
        shares = {c: padding_share(args, c > 0, c) for c in settings}
        rates: dict[int, list[float]] = {c: [] for c in settings}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for c in settings:
                    rates[c].append(one_stage(args, c, Path(tmp) / f"{r}_{c}"))
    except (DataError, ValueError, OSError) as err:
        fail(err)
    what = f"{args.stage} {args.stage_args}" if args.stage else f"a 02 stage of {args.model}, {args.device}"
    print(f"{what}: {args.pairs} pairs per stage, batch {args.batch_size}, max_length {args.max_length}, "
          f"precision {args.precision or ('fp32' if not args.stage else 'of its config')}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = statistics.median(rates[0])
    for c in settings:
        name = f"group_by_length, chunks of {c:<3}" if c else "file order                  "
        median = statistics.median(rates[c])
        print(f"{name}: padding {shares[c]:6.1%} of the tokens; pairs/s "
              + " ".join(f"{x:.1f}" for x in rates[c]) + f" (median {median:.1f}); speed-up {median / base:.2f}x")


if __name__ == "__main__":
    main()
