#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default data (../shared/data/trec-dl) and
# model (all-MiniLM-L6-v2 from PyPI), on CPU, in under 35 minutes on 2 idle cores:
#   prefetch -> distillation set (MS MARCO dev-subset + DL21/DL22 queries less 20 held-out DL21
#   topics, BM25 over the DL21/DL22 passages, bi-encoder teacher fused with BM25; built once into
#   data/distill, data/distill_fused) -> initial cross-encoder with the segment-cosine head, which
#   starts as the bi-encoder itself (02) -> mixed pruning of heads and FFN neurons of all layers
#   while distilling the initial model's segment embeddings (03c) -> reshape (04) -> recovery:
#   the reshaped model goes on distilling the initial one (02 --stage recover) -> TREC evaluation
#   on DL20 of BM25, the teacher, the initial, the pruned and the recovered model (05) ->
#   speed-up of the recovered model over the initial one (bench) -> figures (06).
# DL20 is the evaluation set: `01 distill` refuses any DL20 query among the training queries;
# training is monitored on the 20 held-out DL21 topics.
# Outputs: data/, $RUN/ (checkpoints, results.parquet, results.md, speedup.txt), figures/.
# Re-run over an existing $RUN with OVERWRITE=1. Sizes: TRAIN_PAIRS, PRUNE_PAIRS, RECOVERY_PAIRS, MAX_LENGTH.
# SMOKE=1: the same steps in miniature (300 queries over 3,000 passages, 5 held-out topics, a few
# hundred pairs per stage, 5 DL20 queries) into runs/smoke, data/smoke and runs/smoke/figures:
# what CI runs.
source "$(dirname "$0")/lib.sh"
if [ "${SMOKE:-0}" = 1 ]; then
  RUN=${RUN:-runs/smoke}; DATA=${DATA:-data/smoke}; FIGURES=${FIGURES:-$RUN/figures}
  TRAIN_PAIRS=${TRAIN_PAIRS:-256}; PRUNE_PAIRS=${PRUNE_PAIRS:-512}; RECOVERY_PAIRS=${RECOVERY_PAIRS:-128}
  SUBSET=(--max_queries 300 --max_passages 3000 --holdout 5); EVAL_SUBSET=(--max_queries 5)
  TIMING=(--repeats 1 --latency_queries 1); BENCH=(--queries 1 --rounds 2)
else
  RUN=${RUN:-runs/main}; DATA=${DATA:-data}; FIGURES=${FIGURES:-figures}
  TRAIN_PAIRS=${TRAIN_PAIRS:-2048}; PRUNE_PAIRS=${PRUNE_PAIRS:-10240}; RECOVERY_PAIRS=${RECOVERY_PAIRS:-8192}
  SUBSET=(--holdout 20); EVAL_SUBSET=()
  TIMING=(--repeats 3 --latency_queries 5); BENCH=(--queries 3 --rounds 5)
fi
MAX_LENGTH=${MAX_LENGTH:-128}
guard_run "$RUN"
mkdir -p "$DATA"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
latest() { $PY -m common.rundir latest "$1"; }

step "1/9 prefetch the DL20 evaluation candidates (BM25 top-100)"
$PY 01_prefetch_passages.py json --input "$SHARED/dl20/bm25.json" --tag bm25 "${EVAL_SUBSET[@]}" \
  --output "$DATA/dl20.bm25.candidates.parquet" --run_file "$DATA/dl20.bm25.run" --overwrite

step "2/9 distillation set with held-out DL21 topics (20), and its BM25-fused teacher (kept once built)"
[ -f "$DATA/distill/teacher_scores.parquet" ] || \
  $PY 01_prefetch_passages.py distill --output_dir "$DATA/distill" --shared "$SHARED" "${SUBSET[@]}" --overwrite
[ -f "$DATA/distill_fused/teacher_scores.parquet" ] || \
  $PY 01_prefetch_passages.py distill --from_set "$DATA/distill" --fusion_weight 0.8 \
    --output_dir "$DATA/distill_fused" --overwrite

# mean fused margin 0.290 against 0.157 for cosines: x5.4 puts them on the scale of cosines x10
# (the segment head's starting scale)
TRAIN=(--train_triples_file "$DATA/distill_fused/triples.tsv" --distill_scores "$DATA/distill_fused/teacher_scores.parquet"
       --distill_scale 5.4 --precision bf16 --max_length "$MAX_LENGTH" --batch_size 32 --seed 42
       --eval_candidates_file "$DATA/distill/holdout.candidates.parquet"
       --eval_qrels_file "$DATA/distill/holdout.qrels.txt")

step "3/9 initial cross-encoder (segment-cosine head from the bi-encoder): $TRAIN_PAIRS pairs"
$PY 02_train_initial.py --model_tag all-MiniLM-L6-v2 --head segment_cosine --output_dir "$RUN/initial" \
  --num_training_samples "$TRAIN_PAIRS" --num_checkpoint_samples $(( TRAIN_PAIRS / 2 )) \
  --learning_rate 3e-5 "${TRAIN[@]}"
INITIAL=$(latest "$RUN/initial")

step "4/9 mixed pruning of all layers (heads + FFN, activation importance) while distilling: $PRUNE_PAIRS pairs"
DISTILL_INITIAL=(--distill_from "$INITIAL" --distill_target embeddings --distill_weight 10 --learning_rate 1e-4)
$PY 03c_prune_mixed.py initial --checkpoint_dir "$INITIAL" --output_dir "$RUN/mixed" \
  --num_training_samples "$PRUNE_PAIRS" --num_prune_cycles 4 --target_heads 54 --target_ffn 768 \
  --importance activation --exclude_layers "" --num_checkpoint_samples $(( PRUNE_PAIRS / 4 )) \
  "${DISTILL_INITIAL[@]}" "${TRAIN[@]}"
PRUNED=$(latest "$RUN/mixed")

step "5/9 reshape the pruned model"
$PY 04_reshape.py --checkpoint_dir "$PRUNED"

step "6/9 recovery: the reshaped model goes on distilling the initial one: $RECOVERY_PAIRS pairs"
$PY 02_train_initial.py --stage recover --checkpoint_dir "$PRUNED/reshaped" --output_dir "$RUN/recover" \
  --num_training_samples "$RECOVERY_PAIRS" --num_checkpoint_samples $(( RECOVERY_PAIRS / 2 )) \
  "${DISTILL_INITIAL[@]}" "${TRAIN[@]}"
FINAL=$(latest "$RUN/recover")

step "7/9 evaluate on DL20: BM25, the teacher, the initial, the pruned and the recovered model"
RES=(--candidates "$DATA/dl20.bm25.candidates.parquet" --qrels "$SHARED/dl20/qrels.txt" --topics dl20
     --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length "$MAX_LENGTH")
$PY 05_eval_trec.py --first_stage bm25 "${RES[@]}"
$PY 05_eval_trec.py --checkpoint all-MiniLM-L6-v2 --model_kind bi "${RES[@]}" "${TIMING[@]}"
$PY 05_eval_trec.py --checkpoint "$INITIAL" "$FINAL" "${RES[@]}" "${TIMING[@]}"
$PY 05_eval_trec.py --checkpoint "$PRUNED/reshaped" "${RES[@]}" --no_costs  # before recovery: quality only

step "8/9 speed-up of the pruned model over the initial one (alternating, one process, real DL20 lengths)"
$PY bench/speedup.py --baseline "$INITIAL" --candidate "$FINAL" \
  --candidates "$DATA/dl20.bm25.candidates.parquet" --max_length "$MAX_LENGTH" "${BENCH[@]}" \
  | tee "$RUN/speedup.txt"

step "9/9 figures"
$PY 06_plots.py --runs_dir "$RUN" --results "$RUN/results.parquet" --out_dir "$FIGURES"
echo "== done in $(( $(date +%s) - start ))s"
cat "$RUN/results.md"
