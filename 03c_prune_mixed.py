#!/usr/bin/env python
"""Step 3c: prune heads and FFN neurons on one schedule.

Mode `initial` (the default) starts from a checkpoint of 02 (optionally training
--num_warmup_samples pairs first); `continue` (or --resume) resumes a checkpoint of this stage. Each of --num_prune_cycles cycles
prunes ~(heads to remove)/cycles heads by confidence and ~(FFN - target)/cycles neurons per
layer by L1 norm; targets by --target_sparsity or --target_heads/--target_ffn, or a predicted
serving time: --target_latency_ratio R --latency_table FILE (bench/latency_table.py) chooses
the per-layer shape on the table's grid at the first event (common.pruning.latency_shape).

  python 03c_prune_mixed.py initial --checkpoint_dir runs/initial/seen_000006000 \
      --train_triples_file data/dl21.judged.triples.tsv --output_dir runs/mixed \
      --num_training_samples 4000 --num_prune_cycles 5 --target_heads 48 --target_ffn 768
  python 03c_prune_mixed.py initial ... --num_prune_cycles 5 \
      --latency_table results/latency/openvino_epyc.json --target_latency_ratio 0.5
"""
from common.cli import apply_mode, mode_positional, parse, run_stage
from common.pruning.cycles import PruneArgs, PruneCallback
from common.training.loop import TrainArgs


def main(argv=None) -> None:
    args, prune, positional = parse([TrainArgs, PruneArgs], __doc__, argv, extra=mode_positional)
    apply_mode(args, positional)
    callback = PruneCallback("mixed", prune)
    run_stage(args, "mixed", callback.schedule, callback)


if __name__ == "__main__":
    main()
