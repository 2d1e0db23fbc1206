#!/usr/bin/env bash
# The longer study recipe (about 2 h of training on 2 cores): distil the packaged
# all-MiniLM-L6-v2 bi-encoder (the teacher, no labels) into the all-MiniLM-L6-v2 cross-encoder
# over the MS MARCO dev-subset + DL21/DL22 queries (BM25 top-100 over the DL21/DL22 passages),
# then evaluate on DL20 (never used for training: 01 distill refuses it).
#   STUDY_PAIRS   pairs of distillation training (default 40960)
#   JUDGED_PAIRS  pairs of a follow-up on the DL21 judged triples (default 0: off)
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/study}
STUDY_PAIRS=${STUDY_PAIRS:-40960}
JUDGED_PAIRS=${JUDGED_PAIRS:-0}
MAX_LENGTH=${MAX_LENGTH:-128}
guard_run "$RUN"

[ -f data/distill/teacher_scores.parquet ] || \
  $PY 01_prefetch_passages.py distill --output_dir data/distill --shared "$SHARED" --holdout 20 --overwrite
$PY 01_prefetch_passages.py json --input "$SHARED/dl20/bm25.json" --output data/dl20.bm25.candidates.parquet \
  --run_file data/dl20.bm25.run --tag bm25 --overwrite
# monitored on the 20 held-out training-side (DL21) topics of data/distill, never on DL20
EVAL=(--eval_candidates_file data/distill/holdout.candidates.parquet --eval_qrels_file data/distill/holdout.qrels.txt
      --max_length "$MAX_LENGTH" --batch_size 32 --seed 42 --precision bf16)

$PY 02_train_initial.py --model_tag all-MiniLM-L6-v2 --train_triples_file data/distill/triples.tsv \
  --distill_scores data/distill/teacher_scores.parquet --distill_scale 10 \
  --output_dir "$RUN/distill" --num_training_samples "$STUDY_PAIRS" \
  --num_checkpoint_samples $(( STUDY_PAIRS / 4 )) --learning_rate 3e-5 "${EVAL[@]}"
FINAL=$($PY -m common.layout latest "$RUN/distill")
if [ "$JUDGED_PAIRS" -gt 0 ]; then
  $PY 01_prefetch_passages.py json --input "$SHARED/dl21/bm25.json" --output data/dl21.bm25.candidates.parquet --overwrite
  $PY 01_prefetch_passages.py triples --candidates data/dl21.bm25.candidates.parquet \
    --qrels "$SHARED/dl21/qrels.txt" --eval_candidates data/dl20.bm25.candidates.parquet data/distill/holdout.candidates.parquet \
    --output data/dl21.judged.triples.tsv --overwrite
  $PY 02_train_initial.py --model_tag "$FINAL" --train_triples_file data/dl21.judged.triples.tsv \
    --seen_pairs 0 --output_dir "$RUN/judged" --num_training_samples "$JUDGED_PAIRS" \
    --num_checkpoint_samples "$JUDGED_PAIRS" --learning_rate 1e-5 "${EVAL[@]}"
  FINAL=$($PY -m common.layout latest "$RUN/judged")
fi
RES=(--candidates data/dl20.bm25.candidates.parquet --qrels "$SHARED/dl20/qrels.txt" --topics dl20
     --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length "$MAX_LENGTH")
$PY 05_eval_trec.py --first_stage bm25 "${RES[@]}"
$PY 05_eval_trec.py --checkpoint "$FINAL" "${RES[@]}" --no_latency
cat "$RUN/results.md"
