#!/usr/bin/env bash
# The cross-encoder's scoring head at equal pairs (README "Quality"): all-MiniLM-L6-v2 trained by
# margin-MSE on the BM25-fused teacher of the main job (data/distill_fused, x5.4), lr 3e-5,
# batch 32 pairs, 128 tokens, bf16, 8,192 pairs with a checkpoint at 4,096 (the two budgets),
# monitored on the 20 held-out DL21 topics; each checkpoint scored once on DL20 at the end
# (bf16 autocast scoring, for time: every arm alike).
#   classifier   the monoBERT 2-label head (fresh)
#   segment      the segment-cosine head (common.models.segment: starts as the bi-encoder)
#   segment_gate the same with the cross-segment gates at 100x the LR (3e-3), so that
#                cross-attention can open within the budget if the loss wants it
# Needs the main job's data (bash recipes/main.sh builds it). THREADS (default 1) per arm; the
# three arms run at once.
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/head_compare}
PAIRS=${PAIRS:-8192}
THREADS=${THREADS:-1}
guard_run "$RUN"
mkdir -p "$RUN"
export OMP_NUM_THREADS=$THREADS
COMMON=(--model_tag all-MiniLM-L6-v2 --num_training_samples "$PAIRS" --num_checkpoint_samples $(( PAIRS / 2 ))
        --train_triples_file data/distill_fused/triples.tsv --distill_scores data/distill_fused/teacher_scores.parquet
        --distill_scale 5.4 --learning_rate 3e-5 --batch_size 32 --max_length 128 --seed 42 --precision bf16
        --threads "$THREADS" --eval_candidates_file data/distill/holdout.candidates.parquet
        --eval_qrels_file data/distill/holdout.qrels.txt)
arm() { local name=$1; shift; $PY 02_train_initial.py "${COMMON[@]}" --output_dir "$RUN/$name" "$@" > "$RUN/$name.log" 2>&1; }
arm classifier --head classifier &
arm segment --head segment_cosine &
arm segment_gate --head segment_cosine --gate_learning_rate 3e-3 &
for job in $(jobs -p); do wait "$job"; done  # a failed arm fails the recipe
RES=(--qrels "$SHARED/dl20/qrels.txt" --candidates data/dl20.bm25.candidates.parquet --topics dl20
     --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length 128 --no_costs --threads 2
     --backend torch-bf16)  # scored under bf16 autocast, every arm alike (the main job's table: fp32)
for name in classifier segment segment_gate; do
  $PY 05_eval_trec.py --all_checkpoints "$RUN/$name" "${RES[@]}"
done
cat "$RUN/results.md"
