#!/usr/bin/env bash
# Short runs of each pruning script (03a heads, 03b FFN, 03c mixed) from one initial checkpoint,
# reshaped by 04 and evaluated on DL20 by 05 (quality, latency, FLOPs, params) into one results
# table, then bench/speedup.py for each pruned model against the initial one, in one process.
#   INITIAL=runs/main/initial/seen_000002560 bash recipes/prune_demo.sh
source "$(dirname "$0")/lib.sh"
INITIAL=${INITIAL:?set INITIAL to a checkpoint of 02}
RUN=${RUN:-runs/prune_demo}
PAIRS=${PAIRS:-1600}
MAX_LENGTH=${MAX_LENGTH:-192}
guard_run "$RUN"
COMMON=(--checkpoint_dir "$INITIAL" --train_triples_file data/dl21.judged.triples.tsv
        --num_training_samples "$PAIRS" --learning_rate 2e-5 --max_length "$MAX_LENGTH" --batch_size 16 --seed 42)
$PY 03a_prune_heads.py "${COMMON[@]}" --output_dir "$RUN/heads" --target_sparsity 0.4
$PY 03b_prune_intermediates.py "${COMMON[@]}" --output_dir "$RUN/ffn" --target_sparsity 0.5 --num_prune_cycles 4
$PY 03c_prune_mixed.py initial "${COMMON[@]}" --output_dir "$RUN/mixed" --num_prune_cycles 4 \
  --target_heads 48 --target_ffn 768
RES=(--candidates data/dl20.bm25.candidates.parquet --qrels "$SHARED/dl20/qrels.txt" --topics dl20
     --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length "$MAX_LENGTH"
     --repeats 3 --latency_queries 5)
PRUNED=()
for kind in heads ffn mixed; do
  last=$($PY -m common.layout latest "$RUN/$kind")
  $PY 04_reshape.py --checkpoint_dir "$last"
  PRUNED+=("$last/reshaped")
done
$PY 05_eval_trec.py --first_stage bm25 "${RES[@]}"
$PY 05_eval_trec.py --checkpoint "$INITIAL" "${PRUNED[@]}" "${RES[@]}"
for model in "${PRUNED[@]}"; do
  $PY bench/speedup.py --baseline "$INITIAL" --candidate "$model" \
    --candidates data/dl20.bm25.candidates.parquet --queries 3 --rounds 5 --max_length "$MAX_LENGTH"
done | tee "$RUN/speedup.txt"
cat "$RUN/results.md"
