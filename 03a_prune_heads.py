#!/usr/bin/env python
"""Step 3a: keep training a checkpoint while removing attention heads by confidence.

One head per cycle until --target_sparsity of the prunable heads (layers not in
--exclude_layers) are gone, plus one recovery cycle; cycles split --num_training_samples
evenly and the LR restarts at its peak after every prune (cosine with hard restarts).

  python 03a_prune_heads.py --checkpoint_dir runs/initial/seen_000006000 \
      --train_triples_file data/dl21.judged.triples.tsv --output_dir runs/heads \
      --num_training_samples 4000 --target_sparsity 0.3 --learning_rate 7e-6
"""
from common.cli import parse, run_stage
from common.pruning.cycles import PruneArgs, PruneCallback
from common.training.loop import TrainArgs


def main(argv=None) -> None:
    args, prune = parse([TrainArgs, PruneArgs], __doc__, argv)
    callback = PruneCallback("heads", prune)
    run_stage(args, "heads", callback.schedule, callback)


if __name__ == "__main__":
    main()
