#!/usr/bin/env python
"""Step 4: drop the masks and physically shrink the linear layers of a pruned checkpoint.

Slices q/k/v rows, attention-output columns, FFN input rows and output columns, updates the
head-count attributes, and replaces fully pruned attention blocks. Saves a compact,
self-describing model (model.safetensors + base config.json + tokenizer + pruning.json) that
common.load_model rebuilds without pickled modules.

  python 04_reshape.py --checkpoint_dir runs/mixed/seen_000010000_heads_058_ffn_07296 \
      --output_dir runs/mixed/seen_000010000_heads_058_ffn_07296/reshaped
  python 04_reshape.py --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi --keep_layers 3 \
      --output_dir runs/baselines/minilm-bi-3layers      # layer dropping (L3Prune-style)
"""
from __future__ import annotations

import argparse

from common.cli import fail, positive_int
from common.modeling import reshape_checkpoint


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--output_dir", help="default: CHECKPOINT_DIR/reshaped")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--keep_layers", type=positive_int,
                        help="layer-dropping baseline: keep only the first N layers")
    parser.add_argument("--model_kind", choices=["cross", "bi"],
                        help="for a plain model dir or tag (e.g. a bi-encoder baseline)")
    args = parser.parse_args(argv)
    try:
        out, before, after = reshape_checkpoint(args.checkpoint_dir, args.output_dir, args.overwrite,
                                                args.keep_layers, args.model_kind)
    except (FileExistsError, ValueError, OSError) as err:
        fail(err)
    print(f"wrote {out}: {before / 1e6:.2f}M -> {after / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
