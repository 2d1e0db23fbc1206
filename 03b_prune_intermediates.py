#!/usr/bin/env python
"""Step 3b: keep training a checkpoint while removing FFN neurons by L1 magnitude.

Equal steps of neurons over --num_prune_cycles cycles until --target_sparsity of each
prunable layer's FFN is gone (--scope layer|global), plus one recovery cycle; cycles split
--num_training_samples evenly and the LR restarts after every prune (cosine, hard restarts).

  python 03b_prune_intermediates.py --checkpoint_dir runs/initial/seen_000006000 \
      --train_triples_file data/dl21.judged.triples.tsv --output_dir runs/ffn \
      --num_training_samples 4000 --target_sparsity 0.5 --num_prune_cycles 5 --learning_rate 7e-6
"""
from common.cli import parse, run_stage
from common.pruning.cycles import PruneArgs, PruneCallback
from common.training.loop import TrainArgs


def main(argv=None) -> None:
    args, prune = parse([TrainArgs, PruneArgs], __doc__, argv)
    callback = PruneCallback("ffn", prune)
    run_stage(args, "ffn", callback.schedule, callback)


if __name__ == "__main__":
    main()
