#!/usr/bin/env bash
# The matched-cost study (issue #17): every pruning method at the same multiply-add budget, with
# the same pairs, the same distillation and the same recovery; DL20 and DL21 scored once, at the
# end (report). Each registered run is one settings file, recipes/config/matched_cost/<run>.toml;
# one arm per invocation, so that arms can run two at a time at one thread each:
#
#   bash recipes/matched_cost.sh recipes/config/matched_cost/bi_3x.toml l0          # runs/matched/bi_l0_3x
#   bash recipes/matched_cost.sh recipes/config/matched_cost/bi_3x.toml activation  # ... beside it
#   bash recipes/matched_cost.sh recipes/config/matched_cost/bi_3x.toml report      # tables + one benchmark per arm
#   bash recipes/matched_cost.sh CONFIG ARM continue   # go on with an arm that stopped (finished stages kept,
#                                                      # a stopped one resumed exactly from its latest checkpoint)
#
# Arms (kind = "bi": the packaged all-MiniLM-L6-v2 encoder; kind = "cross": the main job's initial
# cross-encoder, initial = <its checkpoint>), at ratio = 2 or 3 (x fewer multiply-adds per
# max_length-token sequence, common.evaluation.cost):
#   reference   03c, the reference study's criteria (head confidence, FFN L1), heads and FFN of
#               all layers cut to 1/ratio (72/ratio heads, 1536/ratio neurons per layer: exactly
#               1/ratio of the encoder's multiply-adds), 6 prune cycles
#   activation  03c as reference, heads and neurons scored from activations
#   l0          03d, hard-concrete gates with the cost target --target_macs_ratio 1/ratio
#               (Lagrangian over the first half of the stage; exact masks at the end)
#   first_n     04 --keep_layers 6/ratio (layer dropping: the first 3 or 2 layers)
#   l3prune     04 --keep_layers $l3 (small, default, or large: common.pruning.l3prune, the task loss
#               at each depth on the first 256 training triples); its cost is what it chooses
# Every pruning stage (reference, activation, l0) trains `pairs` pairs while distilling the unpruned
# model (bi: MSE to its embeddings; cross: MSE to its segment embeddings), is reshaped (04), then
# recovers for `recovery_pairs` pairs on the next triples of the stream (02 --stage recover, the same
# distillation). Layer-dropping arms have no pruning stage: their recovery gets pairs +
# recovery_pairs pairs from the start of the stream, so every arm sees the same pairs.
# Training is monitored on the 20 held-out training-side topics of data/distill (never DL20).
# Settings (the TOML file; a name not listed here is an error): pairs (12288), recovery_pairs (12288),
# lr (1e-4), recovery_lr (lr), batch (32), max_length (128), threads (1), seed (42), precision (fp32;
# bf16 autocast only on a CPU with native bf16), ratio (3), l3 (small), data (data), root (runs/matched
# for kind bi, runs/matched_cross for cross), initial (kind cross: the main job's initial checkpoint),
# loss (embeddings: the distillation above, on the labels of data/distill/triples.tsv; main, kind cross
# only: the main job's loss, recipes/config/main/prune.toml: margin-MSE to the BM25-fused teacher's
# margins x 5.4 on data/distill_fused/triples.tsv plus 10 x MSE to the initial model's segment embeddings),
# query_encoder (none; kind bi only: a frozen encoder embeds the queries (--query_encoder, e.g. the
# packaged all-MiniLM-L6-v2) and the pruned model only the passages, in both stages; the models
# name it in their config, so the report scores them that way; the unpruned row stays symmetric),
# hidden (0: weight of the layer-wise hidden-state distillation to the same teacher (--distill_hidden:
# student layer i vs teacher layer i, CoFi-style), in both stages), l0_init (constant; importance: the l0
# arm's gates start from activation importance at the target cost, 03d --l0_init), target_ramp (none:
# the Lagrangian over the first half; F: the l0 arm's target reached over the first F of the stage and held),
# triples (the training stream, loss embeddings only: default $data/distill/triples.tsv; e.g. a set of
# `01 mix` with pseudo-queries, recipes/augment.sh), cache_teacher (false; kind bi: --cache_teacher, the teacher's
# embeddings of each stage's texts computed once, not at every step), group_by_length (false: --group_by_length),
# recovery_checkpoints (2: checkpoints over the recovery stage; more for a stage that spans sessions, `continue`).
# Recovery starts on the stream where the pruning stage stopped (the pruned checkpoint's seen pairs).
# Outputs: $root/<kind>_<arm>_<ratio>x/ (final.txt names the recovered model), and from `report`
# $root/results.md (DL20 and DL21), speedup.txt and figures/ (06).
source "$(dirname "$0")/lib.sh"
CONFIG=${1:?usage: bash recipes/matched_cost.sh recipes/config/matched_cost/RUN.toml ARM|report [continue]}
ACTION=${2:?usage: bash recipes/matched_cost.sh CONFIG ARM|report [continue] (ARM: reference, activation, l0, first_n, l3prune)}
case "$ACTION" in reference|activation|l0|first_n|l3prune|report) ;;
  *) echo "error: the arm must be reference, activation, l0, first_n, l3prune or report, got $ACTION" >&2; exit 1 ;; esac
case "${3:-}" in "") CONTINUE=0 ;; continue) CONTINUE=1 ;;
  *) echo "error: the third argument may only be 'continue', got ${3}" >&2; exit 1 ;; esac
SETTINGS=$($PY -m common.settings "$CONFIG" kind=bi root= pairs=12288 recovery_pairs=12288 lr=1e-4 recovery_lr= \
  batch=32 max_length=128 threads=1 seed=42 precision=fp32 ratio=3 l3=small data=data initial= loss=embeddings \
  query_encoder= hidden=0 l0_init=constant target_ramp= triples= cache_teacher=0 group_by_length=0 recovery_checkpoints=2)
eval "$SETTINGS"
case "$KIND" in bi) ROOT=${ROOT:-runs/matched} ;; cross) ROOT=${ROOT:-runs/matched_cross} ;;
  *) echo "error: $CONFIG: kind must be bi or cross, got $KIND" >&2; exit 1 ;; esac
RECOVERY_LR=${RECOVERY_LR:-$LR}
latest() { $PY -m common.layout latest "$1"; }
if [ "$KIND" = bi ]; then
  BASE=all-MiniLM-L6-v2; KIND_ARGS=(--model_kind bi); DISTILL=(--distill_target embeddings --contrastive_weight 0)
else
  [ -n "$INITIAL" ] || { echo "error: $CONFIG: kind cross needs initial = (the initial checkpoint of the main job)" >&2; exit 1; }
  BASE=$INITIAL; KIND_ARGS=()
  DISTILL=(--distill_target embeddings)
fi
WEIGHT=1
case "$LOSS" in
  embeddings) TRIPLES=${TRIPLES:-$DATA/distill/triples.tsv} ;;
  main) [ "$KIND" = cross ] || { echo "error: $CONFIG: loss main is the cross-encoder's loss (kind cross)" >&2; exit 1; }
        [ -z "$TRIPLES" ] || { echo "error: $CONFIG: triples is for loss embeddings (main reads the fused set)" >&2; exit 1; }
        TRIPLES="$DATA/distill_fused/triples.tsv"; WEIGHT=10
        DISTILL+=(--distill_scores "$DATA/distill_fused/teacher_scores.parquet" --distill_scale 5.4) ;;
  *) echo "error: $CONFIG: loss must be embeddings or main, got $LOSS" >&2; exit 1 ;;
esac
for v in CACHE_TEACHER GROUP_BY_LENGTH; do
  [[ "${!v}" =~ ^[01]$ ]] || { echo "error: $CONFIG: ${v,,} must be true or false, got ${!v}" >&2; exit 1; }
done
[ "$CACHE_TEACHER" = 0 ] || [ "$KIND" = bi ] || { echo "error: $CONFIG: cache_teacher is for bi-encoders (kind bi)" >&2; exit 1; }
[[ "$RECOVERY_CHECKPOINTS" =~ ^[1-9][0-9]*$ ]] && (( RECOVERY_PAIRS % (RECOVERY_CHECKPOINTS * BATCH) == 0 )) || {
  echo "error: $CONFIG: recovery_checkpoints must be a positive integer dividing recovery_pairs into whole batches, got $RECOVERY_CHECKPOINTS" >&2; exit 1; }
embedded_data "$DATA"
if [ "$LOSS" = main ] && [ ! -f "$DATA/distill_fused/teacher_scores.parquet" ]; then
  $PY 01_prefetch_passages.py distill --from_set "$DATA/distill" --fusion_weight 0.8 --output_dir "$DATA/distill_fused"
fi
COMMON=(--train_triples_file "$TRIPLES" --distill_from "$BASE" "${DISTILL[@]}" --distill_weight "$WEIGHT"
        --batch_size "$BATCH" --max_length "$MAX_LENGTH" --seed "$SEED" --threads "$THREADS"
        --precision "$PRECISION"
        --eval_candidates_file "$DATA/distill/holdout.candidates.parquet" --eval_qrels_file "$DATA/distill/holdout.qrels.txt")
[ "$HIDDEN" = 0 ] || COMMON+=(--distill_hidden "$HIDDEN")
[ "$CACHE_TEACHER" = 0 ] || COMMON+=(--cache_teacher)
[ "$GROUP_BY_LENGTH" = 0 ] || COMMON+=(--group_by_length)
if [ -n "$QUERY_ENCODER" ]; then
  [ "$KIND" = bi ] || { echo "error: $CONFIG: query_encoder is for bi-encoders (kind bi)" >&2; exit 1; }
  COMMON+=(--query_encoder "$QUERY_ENCODER")
fi

if [ "$ACTION" = report ]; then
  RES=(--max_length "$MAX_LENGTH" --threads 2)
  mapfile -t FINALS < <(for f in "$ROOT"/*/final.txt; do [ -f "$f" ] && cat "$f"; done)
  mapfile -t PRUNED < <(for f in "$ROOT"/*/pruned.txt; do [ -f "$f" ] && cat "$f"; done)
  [ ${#FINALS[@]} -gt 0 ] || { echo "error: no finished arm in $ROOT (no */final.txt)" >&2; exit 1; }
  rm -f "$ROOT"/results*.parquet "$ROOT"/results*.md
  for year in dl20 dl21; do  # one table: both topic sets, quality + fvcore multiply-adds (no timing)
    $PY 05_eval_trec.py --checkpoint "$BASE" "${PRUNED[@]}" "${FINALS[@]}" "${KIND_ARGS[@]}" --no_latency "${RES[@]}" \
      --candidates "$DATA/$year.bm25.candidates.parquet" --qrels "$SHARED/$year/qrels.txt" --topics "$year" \
      --results "$ROOT/results.parquet" --table "$ROOT/results.md"
  done
  $PY 06_plots.py --runs_dir "$ROOT" --results "$ROOT/results.parquet" --out_dir "$ROOT/figures"
  ENCODE=(); [ "$KIND" = bi ] && ENCODE=(--encode)
  for model in "${FINALS[@]}"; do
    $PY bench/speedup.py "${KIND_ARGS[@]}" --baseline "$BASE" --candidate "$model" "${ENCODE[@]}" \
      --candidates "$DATA/dl20.bm25.candidates.parquet" --queries 5 --rounds 5 --max_length "$MAX_LENGTH" --threads 2
  done | tee "$ROOT/speedup.txt"
  cat "$ROOT/results.md"
  exit 0
fi

ARM=$ACTION
case "$RATIO" in 2|3) ;; *) echo "error: $CONFIG: ratio must be 2 or 3, got $RATIO" >&2; exit 1 ;; esac
NAME="${KIND}_${ARM}_${RATIO}x"; [ "$ARM" = l3prune ] && NAME="${KIND}_l3prune_${L3}"
RUN="$ROOT/$NAME"
# continue: keep $RUN, skip the stages that finished (a stage's last checkpoint is there) and resume a stopped one
# from its latest checkpoint (a stage that starts from BASE begins at BASE's seen pairs: 0 for the packaged encoder)
BASE_SEEN=$(seen_of "$BASE")
if [ "$CONTINUE" != 1 ]; then guard_run "$RUN"; fi
mkdir -p "$RUN"
# the pruning stage (reference, activation, l0): its start, its resume, or nothing when it finished
STATE=$(stage_state "$RUN/prune" $(( BASE_SEEN + PAIRS )))
case "$STATE" in done) FROM=() ;; start) FROM=(initial --checkpoint_dir "$BASE") ;;
  *) FROM=(continue --checkpoint_dir "$STATE") ;; esac
HEADS=$(( 72 / RATIO )); FFN=$(( 1536 / RATIO ))
case "$ARM" in
  reference|activation)
    importance=confidence; [ "$ARM" = activation ] && importance=activation
    [ ${#FROM[@]} = 0 ] || $PY 03c_prune_mixed.py "${FROM[@]}" "${KIND_ARGS[@]}" --output_dir "$RUN/prune" \
      --importance "$importance" --exclude_layers "" --num_prune_cycles 6 --target_heads "$HEADS" --target_ffn "$FFN" \
      --num_training_samples "$PAIRS" --num_checkpoint_samples $(( PAIRS / 4 )) --learning_rate "$LR" "${COMMON[@]}"
    ;;
  l0)
    ratio=$($PY -c "print(1 / $RATIO)")
    [ ${#FROM[@]} = 0 ] || $PY 03d_prune_l0.py "${FROM[@]}" "${KIND_ARGS[@]}" --output_dir "$RUN/prune" \
      --target_macs_ratio "$ratio" --l0_init "$L0_INIT" ${TARGET_RAMP:+--target_ramp "$TARGET_RAMP"} --num_training_samples "$PAIRS" --num_checkpoint_samples $(( PAIRS / 4 )) --learning_rate "$LR" "${COMMON[@]}"
    ;;
  first_n|l3prune)
    keep=$(( 6 / RATIO )); [ "$ARM" = l3prune ] && keep=$L3
    $PY 04_reshape.py --checkpoint_dir "$BASE" "${KIND_ARGS[@]}" --keep_layers "$keep" --output_dir "$RUN/dropped" \
      --layer_loss_triples "$DATA/distill/triples.tsv" --max_length "$MAX_LENGTH"
    echo "$RUN/dropped" > "$RUN/pruned.txt"
    $PY 02_train_initial.py --stage recover --checkpoint_dir "$RUN/dropped" --output_dir "$RUN/recover" \
      --num_training_samples $(( PAIRS + RECOVERY_PAIRS )) --num_checkpoint_samples $(( (PAIRS + RECOVERY_PAIRS) / 4 )) \
      --seen_pairs 0 --learning_rate "$LR" "${COMMON[@]}"
    latest "$RUN/recover" > "$RUN/final.txt"
    echo "== $NAME done: $(cat "$RUN/final.txt")"
    exit 0
    ;;
  *) echo "error: the arm must be reference, activation, l0, first_n, l3prune or report, got $ARM" >&2; exit 1 ;;
esac
PRUNED_CKPT=$(latest "$RUN/prune")
SEEN=$(seen_of "$PRUNED_CKPT")
[ -f "$PRUNED_CKPT/reshaped/pruning.json" ] || $PY 04_reshape.py --checkpoint_dir "$PRUNED_CKPT"
echo "$PRUNED_CKPT/reshaped" > "$RUN/pruned.txt"
STATE=$(stage_state "$RUN/recover" $(( SEEN + RECOVERY_PAIRS )))
FROM=(--checkpoint_dir "$PRUNED_CKPT/reshaped")
[ "$STATE" = start ] || [ "$STATE" = done ] || FROM=(--checkpoint_dir "$STATE" --resume)
[ "$STATE" = done ] || $PY 02_train_initial.py --stage recover "${FROM[@]}" --output_dir "$RUN/recover" \
  --num_training_samples "$RECOVERY_PAIRS" --num_checkpoint_samples $(( RECOVERY_PAIRS / RECOVERY_CHECKPOINTS )) \
  --seen_pairs "$SEEN" "${COMMON[@]}" --learning_rate "$RECOVERY_LR"
latest "$RUN/recover" > "$RUN/final.txt"
echo "== $NAME done: $(cat "$RUN/final.txt")"
