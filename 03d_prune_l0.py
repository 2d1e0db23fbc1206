#!/usr/bin/env python
"""Step 3d: learned structured pruning to a target with hard-concrete L0 gates (common.pruning.l0).

Gates on every attention head, every FFN neuron and, per layer, the whole attention block and
the whole FFN block learn beside the weights; a Lagrangian drives the expected cost
(--target_macs_ratio: multiply-adds per --max_length sequence / the unpruned model's; or
--target_latency_ratio with --latency_table FILE: the serving time bench/latency_table.py
measured on the serving backend and host, as a linear cost, / the unpruned model's) or shape
(--target_heads in total or --target_heads_per_layer in each kept layer, --target_ffn per layer
on average, --target_layers) to the target over
--l0_warmup_fraction of the stage. The LR of the weights warms up (--warmup_fraction) and decays
linearly. At the last step the gates become masks that meet the target exactly, their values
folded into the weights: the last checkpoint is an ordinary masked one that 04_reshape.py
reshapes. Intermediate checkpoints carry the gates (l0_gates.pt) for --resume (mode
`continue`); their weights are not yet pruned. Distil from the unpruned model with --distill_from.
--l0_init importance starts the gates from activation importance (at the target's expected cost,
or --l0_init_cost full); --target_ramp 0.2 reaches the target in the first 20 % of the stage and
holds the expected cost on that schedule.

  python 03d_prune_l0.py initial --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi \\
      --train_triples_file data/distill/triples.tsv --output_dir runs/l0 \\
      --distill_from all-MiniLM-L6-v2 --distill_target embeddings --contrastive_weight 0 \\
      --num_training_samples 8192 --target_macs_ratio 0.33 --learning_rate 1e-4
  python 03d_prune_l0.py initial ... --target_macs_ratio 0.33 --l0_init importance \
      --l0_init_cost full --target_ramp 0.2          # warm start, target reached by 20 %
  python 03d_prune_l0.py initial --checkpoint_dir path/to/bge-m3 --model_kind bi ... --target_layers 18 \
      --target_heads_per_layer 12                  # the seed's shape: 24 x 16 heads -> 18 x 12
  python 03d_prune_l0.py initial ... --latency_table results/latency/openvino_epyc.json --target_latency_ratio 0.5
"""
from common.cli import apply_mode, mode_positional, parse, run_stage
from common.pruning.l0 import L0Args, L0Callback
from common.training.loop import TrainArgs


def main(argv=None) -> None:
    args, l0, positional = parse([TrainArgs, L0Args], __doc__, argv, extra=mode_positional)
    apply_mode(args, positional)
    callback = L0Callback(l0)
    run_stage(args, "l0", callback.schedule, callback)


if __name__ == "__main__":
    main()
