#!/usr/bin/env python
"""Step 3c: prune heads and FFN neurons on one schedule.

Mode `initial` starts from a checkpoint of 02 (optionally training --num_warmup_samples pairs
first); `continue` resumes a checkpoint of this stage. Each of --num_prune_cycles cycles
prunes ~(heads to remove)/cycles heads by confidence and ~(FFN - target)/cycles neurons per
layer by L1 norm; targets by --target_sparsity or --target_heads/--target_ffn.

  python 03c_prune_mixed.py initial --checkpoint_dir runs/initial/seen_000006000 \
      --train_triples_file data/dl21.judged.triples.tsv --output_dir runs/mixed \
      --num_training_samples 4000 --num_prune_cycles 5 --target_heads 48 --target_ffn 768
"""
from common.cli import fail, parse, run_stage
from common.pruning import PruneArgs, PruneCallback
from common.trainer import TrainArgs, read_trainer_state


def main(argv=None) -> None:
    def mode(parser):
        parser.add_argument("mode", choices=["initial", "continue"],
                            help="initial: start from a 02 checkpoint; continue: resume this stage")
    args, prune, positional = parse([TrainArgs, PruneArgs], __doc__, argv, extra=mode)
    chosen = positional.mode
    stage = (read_trainer_state(args.checkpoint_dir) or {}).get("stage") if args.checkpoint_dir else None
    if chosen == "continue" and stage != "mixed":
        fail(ValueError(f"'continue' needs a checkpoint of this stage; {args.checkpoint_dir} is {stage!r}"))
    if chosen == "initial" and stage == "mixed":
        fail(ValueError(f"{args.checkpoint_dir} is already a mixed-pruning checkpoint: use 'continue'"))
    callback = PruneCallback("mixed", prune)
    run_stage(args, "mixed", callback.schedule, callback)


if __name__ == "__main__":
    main()
