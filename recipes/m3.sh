#!/usr/bin/env bash
# The M3 study (issue #36): a bi-encoder given BGE-M3's sparse and ColBERT heads, trained with the
# unified loss and self-distillation, then pruned 2x with its heads; DL20 and DL21 scored once per
# head (dense, sparse, ColBERT, combined 1 / 0.3 / 1), at the end (report).
#
#   bash recipes/m3.sh recipes/config/m3/minilm.toml          # unified -> prune (03c) -> 04 -> recover
#   bash recipes/m3.sh recipes/config/m3/minilm.toml report   # DL20/DL21 table, a row per head (05)
#
# Stages, each on the next `pairs` triples of data/distill/triples.tsv (the embedded stream), batch,
# max_length, seed, threads and precision as set, monitored on data/distill's 20 held-out
# training-side topics (never DL20):
#   unified  02 from `model` with --heads dense,sparse,colbert (new heads initialised as nn.Linear):
#            the unified in-batch loss with self-distillation (docs/dense_and_m3.md), at lr
#   prune    03c from unified's last checkpoint, activation importance, 6 prune cycles, every layer cut
#            to 72/ratio heads and 1536/ratio FFN neurons per layer (1/ratio of the encoder's
#            multiply-adds), unified loss + MSE to the unified model's dense embeddings, at prune_lr
#   pruned   04: the masks dropped, a physically smaller model with the three heads
#   recover  02 --stage recover from the pruned dir, the prune stage's losses, at recovery_lr
# Settings (the TOML file; a name not listed here is an error): model (all-MiniLM-L6-v2),
# root (runs/m3), heads (dense,sparse,colbert), ratio (2), pairs (8192), lr (5e-5), prune_lr (1e-4),
# recovery_lr (5e-5), batch (32), max_length (128), threads (2), seed (42), precision (fp32), data (data).
# Outputs: $root/unified, $root/prune, $root/pruned, $root/recover, and $root/<stage>.txt naming
# each stage's model (the report scores those), and from `report` $root/results.md and results.parquet.
source "$(dirname "$0")/lib.sh"
CONFIG=${1:?usage: bash recipes/m3.sh recipes/config/m3/RUN.toml [report]}
case "${2:-}" in "") REPORT=0 ;; report) REPORT=1 ;;
  *) echo "error: the second argument may only be 'report', got $2" >&2; exit 1 ;; esac
SETTINGS=$($PY -m common.settings "$CONFIG" model=all-MiniLM-L6-v2 root=runs/m3 heads=dense,sparse,colbert ratio=2 \
  pairs=8192 lr=5e-5 prune_lr=1e-4 recovery_lr=5e-5 batch=32 max_length=128 threads=2 seed=42 precision=fp32 data=data)
eval "$SETTINGS"
case "$RATIO" in 2|3) ;; *) echo "error: $CONFIG: ratio must be 2 or 3, got $RATIO" >&2; exit 1 ;; esac
TRIPLES="$DATA/distill/triples.tsv"
embedded_data "$DATA"
latest() { $PY -m common.layout latest "$1"; }
COMMON=(--train_triples_file "$TRIPLES" --model_kind bi --batch_size "$BATCH" --max_length "$MAX_LENGTH" --seed "$SEED"
        --threads "$THREADS" --precision "$PRECISION" --num_training_samples "$PAIRS"
        --num_checkpoint_samples $(( PAIRS / 2 ))
        --eval_candidates_file "$DATA/distill/holdout.candidates.parquet" --eval_qrels_file "$DATA/distill/holdout.qrels.txt")

if [ "$REPORT" = 1 ]; then
  mapfile -t MODELS < <(for s in unified prune pruned recover; do f="$ROOT/$s.txt"; [ -f "$f" ] && cat "$f"; done)
  [ ${#MODELS[@]} -gt 0 ] || { echo "error: no finished stage in $ROOT (no <stage>.txt)" >&2; exit 1; }
  score_bi "$ROOT" "$DATA" "$MAX_LENGTH" "$THREADS" "$MODEL" "${MODELS[@]}"
  exit 0
fi

mkdir -p "$ROOT"
if [ ! -f "$ROOT/unified.txt" ]; then
  $PY 02_train_initial.py --model_tag "$MODEL" --heads "$HEADS" --output_dir "$ROOT/unified" --overwrite \
    --learning_rate "$LR" "${COMMON[@]}"
  latest "$ROOT/unified" > "$ROOT/unified.txt"
fi
UNIFIED=$(cat "$ROOT/unified.txt")
DISTILL=(--distill_from "$UNIFIED" --distill_target embeddings)
if [ ! -f "$ROOT/prune.txt" ]; then
  $PY 03c_prune_mixed.py initial --checkpoint_dir "$UNIFIED" --output_dir "$ROOT/prune" --overwrite \
    --importance activation --exclude_layers "" --num_prune_cycles 6 --target_heads $(( 72 / RATIO )) \
    --target_ffn $(( 1536 / RATIO )) --learning_rate "$PRUNE_LR" "${DISTILL[@]}" "${COMMON[@]}"
  latest "$ROOT/prune" > "$ROOT/prune.txt"
fi
if [ ! -f "$ROOT/pruned.txt" ]; then
  $PY 04_reshape.py --checkpoint_dir "$(cat "$ROOT/prune.txt")" --model_kind bi --output_dir "$ROOT/pruned" --overwrite
  echo "$ROOT/pruned" > "$ROOT/pruned.txt"
fi
if [ ! -f "$ROOT/recover.txt" ]; then
  $PY 02_train_initial.py --stage recover --checkpoint_dir "$ROOT/pruned" --output_dir "$ROOT/recover" --overwrite \
    --learning_rate "$RECOVERY_LR" "${DISTILL[@]}" "${COMMON[@]}"
  latest "$ROOT/recover" > "$ROOT/recover.txt"
fi
echo "== $ROOT done: $(cat "$ROOT/recover.txt")"
