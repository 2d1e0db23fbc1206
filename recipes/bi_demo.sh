#!/usr/bin/env bash
# Bi-encoder kind: prune the packaged all-MiniLM-L6-v2 bi-encoder (heads + FFN in all six
# layers, 03c, heads and neurons scored from activations) while distilling the unpruned
# encoder's embeddings (no labels), reshape it (04), and compare it on DL20 with the unpruned
# encoder and the layer-dropping baseline (first 3 of 6 layers, about the same FLOPs) in one
# results table (05: quality, re-ranking latency, corpus-encoding throughput, FLOPs) and in one
# alternating benchmark of passage encoding (bench/speedup.py --encode).
# After the reshape, RECOVERY_PAIRS more pairs (02 on the reshaped model itself, ~2x cheaper per
# pair) go on distilling the embeddings, on the next triples of the stream. The layer-dropping
# baseline gets the same recovery stage (from the start of the stream); it runs beside the
# pruning branch (log: $RUN/keep3.log), each branch on THREADS threads.
# Training is monitored on 20 DL21 queries (never used for training here), so DL20, the
# evaluation set, is scored once, at the end; DL21 quality of every model is reported as well.
#   PAIRS (24576), RECOVERY_PAIRS (24576), TARGET (embeddings | scores: what is distilled),
#   THREADS (1), MAX_LENGTH (128)
# Needs the distillation set (data/distill, built by `01_prefetch_passages.py distill`).
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/bi}
PAIRS=${PAIRS:-24576}
RECOVERY_PAIRS=${RECOVERY_PAIRS:-24576}
TARGET=${TARGET:-embeddings}
THREADS=${THREADS:-1}
MAX_LENGTH=${MAX_LENGTH:-128}
guard_run "$RUN"
[ -f data/distill/triples.tsv ] || $PY 01_prefetch_passages.py distill --output_dir data/distill --overwrite
for year in dl20 dl21; do
  $PY 01_prefetch_passages.py json --input "$SHARED/$year/bm25.json" --output data/$year.bm25.candidates.parquet \
    --run_file data/$year.bm25.run --tag bm25 --overwrite
done
mkdir -p "$RUN"
MONITOR=(--eval_candidates_file data/dl21.bm25.candidates.parquet --eval_qrels_file "$SHARED/dl21/qrels.txt"
         --eval_max_queries 20)
RES=(--candidates data/dl20.bm25.candidates.parquet --qrels "$SHARED/dl20/qrels.txt" --topics dl20
     --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length "$MAX_LENGTH"
     --repeats 3 --latency_queries 5)

# recover MODEL OUTPUT_DIR [02 args]: the recovery stage, RECOVERY_PAIRS of embedding distillation
recover() {
  $PY 02_train_initial.py --model_tag "$1" --output_dir "$2" "${@:3}" --train_triples_file data/distill/triples.tsv \
    --distill_from all-MiniLM-L6-v2 --distill_target "$TARGET" --distill_weight 1 --contrastive_weight 0 \
    --num_training_samples "$RECOVERY_PAIRS" --num_checkpoint_samples $(( RECOVERY_PAIRS / 2 )) \
    --learning_rate 1e-4 --batch_size 32 --max_length "$MAX_LENGTH" --seed 42 --threads "$THREADS" "${MONITOR[@]}"
}
keep3_branch() {
  $PY 04_reshape.py --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi --keep_layers 3 --output_dir "$RUN/keep3"
  recover "$RUN/keep3" "$RUN/keep3_recover"
}
keep3_branch > "$RUN/keep3.log" 2>&1 &
KEEP3_PID=$!

$PY 03c_prune_mixed.py initial --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi \
  --train_triples_file data/distill/triples.tsv --output_dir "$RUN/mixed" \
  --distill_from all-MiniLM-L6-v2 --distill_target "$TARGET" --distill_weight 1 --contrastive_weight 0 \
  --importance activation --exclude_layers "" \
  --num_training_samples "$PAIRS" --num_checkpoint_samples $(( PAIRS / 4 )) --num_prune_cycles 6 \
  --target_heads 36 --target_ffn 640 --learning_rate 1e-4 --batch_size 32 --max_length "$MAX_LENGTH" \
  --seed 42 --threads "$THREADS" "${MONITOR[@]}"
PRUNED=$($PY -m common.layout latest "$RUN/mixed")
$PY 04_reshape.py --checkpoint_dir "$PRUNED"
recover "$PRUNED/reshaped" "$RUN/recover" --seen_pairs "$PAIRS"
FINAL=$($PY -m common.layout latest "$RUN/recover")
wait "$KEEP3_PID" || { echo "error: the layer-dropping branch failed, see $RUN/keep3.log" >&2; exit 1; }
KEEP3=$($PY -m common.layout latest "$RUN/keep3_recover")

$PY 05_eval_trec.py --checkpoint all-MiniLM-L6-v2 --model_kind bi "${RES[@]}"
$PY 05_eval_trec.py --checkpoint "$PRUNED/reshaped" "$FINAL" "$RUN/keep3" "$KEEP3" "${RES[@]}"
$PY 05_eval_trec.py --checkpoint all-MiniLM-L6-v2 "$PRUNED/reshaped" "$FINAL" "$RUN/keep3" "$KEEP3" --model_kind bi \
  --candidates data/dl21.bm25.candidates.parquet --qrels "$SHARED/dl21/qrels.txt" --topics dl21 --no_costs \
  --results "$RUN/results_dl21.parquet" --table "$RUN/results_dl21.md" --max_length "$MAX_LENGTH"
for model in "$FINAL" "$KEEP3"; do
  $PY bench/speedup.py --model_kind bi --baseline all-MiniLM-L6-v2 --candidate "$model" --encode \
    --candidates data/dl20.bm25.candidates.parquet --queries 5 --rounds 5 --max_length "$MAX_LENGTH"
done | tee "$RUN/speedup.txt"
cat "$RUN/results.md" "$RUN/results_dl21.md"
