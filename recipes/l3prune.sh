#!/usr/bin/env bash
# L3Prune's autoprune (small + large from one layerwise loss), recovered with full fine-tuning and
# with LoRA, for each pooling, on a bi-encoder; DL20 and DL21 scored once, at the end (report).
#
#   bash recipes/l3prune.sh recipes/config/l3prune/minilm.toml          # drop + recover every arm
#   bash recipes/l3prune.sh recipes/config/l3prune/minilm.toml report   # DL20/DL21 table (05)
#
# For each pooling: 04 --keep_layers small computes the layerwise loss of the unpruned model (the
# in-batch contrastive loss of every layer's pooled output on the first layer_loss_rows training
# triples) and keeps L3Prune's `small` depth; 04 --keep_layers large --layer_losses takes `large`
# from the same loss. A configuration that keeps every layer drops nothing and is not recovered.
# Each dropped model recovers for `pairs` pairs of data/distill/triples.tsv (02 --stage recover):
# `full` fine-tunes every weight at lr, `lora` trains LoRA adapters (lora_rank, lora_alpha, every
# projection) at lora_lr, merged into the weights at save. Every arm distils the unpruned model's
# embeddings (MSE, as the matched-cost study's layer-dropping arms) and sees the same pairs in the
# same order; training is monitored on data/distill's 20 held-out training-side topics (never DL20).
# Settings (the TOML file; a name not listed here is an error): model (all-MiniLM-L6-v2),
# root (runs/l3prune), poolings (mean,weightedmean), recoveries (full,lora), pairs (12288), lr (1e-4),
# lora_lr (5e-4), lora_rank (16), lora_alpha (32), batch (32), max_length (128), threads (2),
# seed (42), precision (fp32), layer_loss_rows (256), data (data).
# Outputs: $root/<pooling>_<small|large>/ (dropped), $root/<pooling>_<rule>_<recovery>/ (recovery runs;
# final.txt names the last checkpoint), and from `report` $root/results.md and results.parquet.
source "$(dirname "$0")/lib.sh"
CONFIG=${1:?usage: bash recipes/l3prune.sh recipes/config/l3prune/RUN.toml [report]}
case "${2:-}" in "") REPORT=0 ;; report) REPORT=1 ;;
  *) echo "error: the second argument may only be 'report', got $2" >&2; exit 1 ;; esac
SETTINGS=$($PY -m common.settings "$CONFIG" model=all-MiniLM-L6-v2 root=runs/l3prune poolings=mean,weightedmean \
  recoveries=full,lora pairs=12288 lr=1e-4 lora_lr=5e-4 lora_rank=16 lora_alpha=32 batch=32 max_length=128 \
  threads=2 seed=42 precision=fp32 layer_loss_rows=256 data=data)
eval "$SETTINGS"
IFS=, read -ra POOLS <<< "$POOLINGS"
IFS=, read -ra RECOVER <<< "$RECOVERIES"
for r in "${RECOVER[@]}"; do
  case "$r" in full|lora) ;; *) echo "error: $CONFIG: recoveries may hold full and lora, got $r" >&2; exit 1 ;; esac
done
TRIPLES="$DATA/distill/triples.tsv"
embedded_data "$DATA"
layers() { $PY -c "import json, sys; print(json.load(open(sys.argv[1] + '/config.json'))['num_hidden_layers'])" "$1"; }
latest() { $PY -m common.layout latest "$1"; }

if [ "$REPORT" = 1 ]; then
  mapfile -t MODELS < <(for f in "$ROOT"/*/final.txt "$ROOT"/*/dropped.txt; do [ -f "$f" ] && cat "$f"; done | sort -u)
  [ ${#MODELS[@]} -gt 0 ] || { echo "error: no finished arm in $ROOT (no */final.txt)" >&2; exit 1; }
  score_bi "$ROOT" "$DATA" "$MAX_LENGTH" "$THREADS" "$MODEL" "${MODELS[@]}"
  exit 0
fi

mkdir -p "$ROOT"
DEPTH=$($PY -c "import sys; from common.models.loading import model_depth; print(model_depth(sys.argv[1]))" "$MODEL")
for pool in "${POOLS[@]}"; do
  small="$ROOT/${pool}_small"; large="$ROOT/${pool}_large"
  [ -f "$small/pruning.json" ] || $PY 04_reshape.py --checkpoint_dir "$MODEL" --model_kind bi --pooling "$pool" \
    --keep_layers small --layer_loss_triples "$TRIPLES" --layer_loss_rows "$LAYER_LOSS_ROWS" --max_length "$MAX_LENGTH" \
    --output_dir "$small"
  [ -f "$large/pruning.json" ] || $PY 04_reshape.py --checkpoint_dir "$MODEL" --model_kind bi --pooling "$pool" \
    --keep_layers large --layer_losses "$small" --max_length "$MAX_LENGTH" --output_dir "$large"
  for dropped in "$small" "$large"; do
    kept=$(layers "$dropped")
    if [ "$kept" = "$DEPTH" ]; then echo "== $dropped keeps all $DEPTH layers: nothing dropped, not recovered"; continue; fi
    for rec in "${RECOVER[@]}"; do
      run="${dropped}_$rec"
      [ -f "$run/final.txt" ] && { echo "== $run done: $(cat "$run/final.txt")"; continue; }
      extra=(--learning_rate "$LR")
      [ "$rec" = lora ] && extra=(--learning_rate "$LORA_LR" --lora_rank "$LORA_RANK" --lora_alpha "$LORA_ALPHA")
      $PY 02_train_initial.py --stage recover --checkpoint_dir "$dropped" --output_dir "$run" --overwrite \
        --train_triples_file "$TRIPLES" --distill_from "$MODEL" --distill_target embeddings --contrastive_weight 0 \
        --num_training_samples "$PAIRS" --num_checkpoint_samples $(( PAIRS / 2 )) --seen_pairs 0 \
        --batch_size "$BATCH" --max_length "$MAX_LENGTH" --seed "$SEED" --threads "$THREADS" --precision "$PRECISION" \
        --eval_candidates_file "$DATA/distill/holdout.candidates.parquet" --eval_qrels_file "$DATA/distill/holdout.qrels.txt" \
        "${extra[@]}"
      latest "$run" > "$run/final.txt"
      echo "$dropped" > "$run/dropped.txt"
      echo "== $run done: $(cat "$run/final.txt")"
    done
  done
done
