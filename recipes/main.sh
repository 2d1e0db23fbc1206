#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default data (../shared/data/trec-dl) and
# model (all-MiniLM-L6-v2 from PyPI), CPU, in under 30 minutes on 2 cores:
#   prefetch -> judged training triples (DL21) -> initial cross-encoder (02) -> mixed pruning
#   (03c) -> reshape (04) -> TREC evaluation on DL20 with latency and FLOPs (05) -> figures (06).
# Train on the DL21 topics, evaluate on the DL20 topics: 01 refuses overlapping qids.
# Outputs: data/*.parquet|run|tsv, $RUN/ (checkpoints, results.parquet, results.md), figures/.
# Re-run over an existing $RUN with OVERWRITE=1. Sizes: TRAIN_PAIRS, PRUNE_PAIRS, MAX_LENGTH.
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/main}
TRAIN_PAIRS=${TRAIN_PAIRS:-2560}
PRUNE_PAIRS=${PRUNE_PAIRS:-1600}
MAX_LENGTH=${MAX_LENGTH:-192}
guard_run "$RUN"
start=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }

step "1/8 prefetch candidates (DL20 evaluation, DL21 training)"
for topics in dl20 dl21; do
  for list in bm25 bm25_rm3; do
    $PY 01_prefetch_passages.py json --input "$SHARED/$topics/$list.json" --tag "$list" \
      --output "data/$topics.$list.candidates.parquet" --run_file "data/$topics.$list.run" --overwrite
  done
done

step "2/8 training triples from the DL21 judged pools (refused if a DL20 query is among them)"
$PY 01_prefetch_passages.py triples --qrels "$SHARED/dl21/qrels.txt" \
  --candidates data/dl21.bm25.candidates.parquet data/dl21.bm25_rm3.candidates.parquet \
  --eval_candidates data/dl20.bm25.candidates.parquet \
  --output data/dl21.judged.triples.tsv --seed 42 --overwrite

EVAL=(--eval_candidates_file data/dl20.bm25.candidates.parquet --eval_qrels_file "$SHARED/dl20/qrels.txt"
      --eval_max_queries 20 --max_length "$MAX_LENGTH" --batch_size 32 --seed 42)

step "3/8 initial cross-encoder: $TRAIN_PAIRS pairs"
$PY 02_train_initial.py --model_tag all-MiniLM-L6-v2 --train_triples_file data/dl21.judged.triples.tsv \
  --output_dir "$RUN/initial" --num_training_samples "$TRAIN_PAIRS" \
  --num_checkpoint_samples $(( TRAIN_PAIRS / 2 )) --learning_rate 2e-5 "${EVAL[@]}"
INITIAL=$(ls -d "$RUN"/initial/seen_* | tail -n 1)

step "4/8 mixed pruning (heads + FFN) while training: $PRUNE_PAIRS pairs"
$PY 03c_prune_mixed.py initial --checkpoint_dir "$INITIAL" --train_triples_file data/dl21.judged.triples.tsv \
  --output_dir "$RUN/mixed" --num_training_samples "$PRUNE_PAIRS" --num_prune_cycles 4 \
  --num_checkpoint_samples $(( PRUNE_PAIRS / 5 )) --target_heads 48 --target_ffn 768 \
  --learning_rate 2e-5 "${EVAL[@]}"
PRUNED=$(ls -d "$RUN"/mixed/seen_* | tail -n 1)

step "5/8 reshape the pruned model"
$PY 04_reshape.py --checkpoint_dir "$PRUNED"

step "6/8 evaluate on DL20: BM25, the initial and the reshaped pruned model (quality, latency, FLOPs)"
RES=(--candidates data/dl20.bm25.candidates.parquet --qrels "$SHARED/dl20/qrels.txt" --topics dl20
     --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length "$MAX_LENGTH")
$PY 05_eval_trec.py --first_stage bm25 "${RES[@]}"
$PY 05_eval_trec.py --checkpoint "$INITIAL" "$PRUNED/reshaped" "${RES[@]}" --repeats 3 --latency_queries 5

step "7/8 figures"
$PY 06_plots.py --runs_dir "$RUN" --results "$RUN/results.parquet" --out_dir figures

step "8/8 done in $(( $(date +%s) - start ))s"
cat "$RUN/results.md"
