#!/usr/bin/env bash
# What to distil while pruning a bi-encoder, on a short budget (README "Bi-encoders"): the same
# 03c run as recipes/bi_demo.sh (36 heads, FFN 640 in every layer, activation importance,
# lr 1e-4) over PAIRS pairs, once distilling the unpruned encoder's embeddings (MSE) and once
# its scores (margin-MSE on cosine margins), both evaluated on DL20 (quality only).
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/bi_compare}
PAIRS=${PAIRS:-4096}
THREADS=${THREADS:-1}
guard_run "$RUN"
export OMP_NUM_THREADS=$THREADS
[ -f data/distill/triples.tsv ] || $PY 01_prefetch_passages.py distill --output_dir data/distill --overwrite
$PY 01_prefetch_passages.py json --input "$SHARED/dl20/bm25.json" --output data/dl20.bm25.candidates.parquet \
  --run_file data/dl20.bm25.run --tag bm25 --overwrite
for target in embeddings scores; do
  $PY 03c_prune_mixed.py initial --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi \
    --train_triples_file data/distill/triples.tsv --output_dir "$RUN/$target" \
    --distill_from all-MiniLM-L6-v2 --distill_target "$target" --distill_weight 1 --contrastive_weight 0 \
    --importance activation --exclude_layers "" --num_training_samples "$PAIRS" --num_prune_cycles 6 \
    --target_heads 36 --target_ffn 640 --learning_rate 1e-4 --batch_size 32 --max_length 128 \
    --seed 42 --threads "$THREADS"
  $PY 05_eval_trec.py --checkpoint "$($PY -m common.layout latest "$RUN/$target")" \
    --candidates data/dl20.bm25.candidates.parquet --qrels "$SHARED/dl20/qrels.txt" --topics dl20 \
    --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length 128 --no_costs
done
cat "$RUN/results.md"
