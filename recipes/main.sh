#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default data (../shared/data/trec-dl) and
# model (all-MiniLM-L6-v2 from PyPI), on CPU, in under 30 minutes on 2 idle cores:
#   prefetch -> distillation set (MS MARCO dev-subset + DL21/DL22 queries, BM25 over the DL21/DL22
#   passages, bi-encoder teacher scores; built once into data/distill) -> initial cross-encoder
#   by margin-MSE distillation (02) -> mixed pruning while distilling (03c) -> reshape (04) ->
#   TREC evaluation on DL20 with latency and FLOPs (05) -> figures (06).
# DL20 is the evaluation set: `01 distill` refuses any DL20 query among the training queries.
# Outputs: data/, $RUN/ (checkpoints, results.parquet, results.md), figures/.
# Re-run over an existing $RUN with OVERWRITE=1. Sizes: TRAIN_PAIRS, PRUNE_PAIRS, MAX_LENGTH.
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/main}
TRAIN_PAIRS=${TRAIN_PAIRS:-12288}
PRUNE_PAIRS=${PRUNE_PAIRS:-3200}
MAX_LENGTH=${MAX_LENGTH:-128}
guard_run "$RUN"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "1/7 prefetch the DL20 evaluation candidates (BM25 top-100)"
$PY 01_prefetch_passages.py json --input "$SHARED/dl20/bm25.json" --tag bm25 \
  --output data/dl20.bm25.candidates.parquet --run_file data/dl20.bm25.run --overwrite

step "2/7 distillation set (kept in data/distill once built)"
[ -f data/distill/teacher_scores.parquet ] || \
  $PY 01_prefetch_passages.py distill --output_dir data/distill --shared "$SHARED" --overwrite

DISTILL=(--train_triples_file data/distill/triples.tsv --distill_scores data/distill/teacher_scores.parquet
         --distill_scale 10 --learning_rate 3e-5 --precision bf16 --max_length "$MAX_LENGTH"
         --batch_size 32 --seed 42 --eval_candidates_file data/dl20.bm25.candidates.parquet
         --eval_qrels_file "$SHARED/dl20/qrels.txt" --eval_max_queries 20)

step "3/7 initial cross-encoder: $TRAIN_PAIRS pairs of margin-MSE distillation"
$PY 02_train_initial.py --model_tag all-MiniLM-L6-v2 --output_dir "$RUN/initial" \
  --num_training_samples "$TRAIN_PAIRS" --num_checkpoint_samples $(( TRAIN_PAIRS / 2 )) "${DISTILL[@]}"
INITIAL=$(ls -d "$RUN"/initial/seen_* | tail -n 1)

step "4/7 mixed pruning (heads + FFN) while distilling: $PRUNE_PAIRS pairs"
$PY 03c_prune_mixed.py initial --checkpoint_dir "$INITIAL" --output_dir "$RUN/mixed" \
  --num_training_samples "$PRUNE_PAIRS" --num_prune_cycles 4 --target_heads 48 --target_ffn 768 \
  --num_checkpoint_samples $(( PRUNE_PAIRS / 5 )) "${DISTILL[@]}"
PRUNED=$(ls -d "$RUN"/mixed/seen_* | tail -n 1)

step "5/7 reshape the pruned model"
$PY 04_reshape.py --checkpoint_dir "$PRUNED"

step "6/7 evaluate on DL20: BM25, the initial and the reshaped pruned model (quality, latency, FLOPs)"
RES=(--candidates data/dl20.bm25.candidates.parquet --qrels "$SHARED/dl20/qrels.txt" --topics dl20
     --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length "$MAX_LENGTH")
$PY 05_eval_trec.py --first_stage bm25 "${RES[@]}"
$PY 05_eval_trec.py --checkpoint "$INITIAL" "$PRUNED/reshaped" "${RES[@]}" --repeats 3 --latency_queries 5

step "7/7 figures"
$PY 06_plots.py --runs_dir "$RUN" --results "$RUN/results.parquet" --out_dir figures
echo "== done in $(( $(date +%s) - start ))s"
cat "$RUN/results.md"
