#!/usr/bin/env bash
# Distillation choices on a short budget (README "Quality"), each arm 6,144 pairs from the
# packaged all-MiniLM-L6-v2, lr 3e-5, batch 32 pairs, 128 tokens, bf16, evaluated on DL20:
#   fusion    the teacher (bi-encoder) interpolated with BM25: weight chosen on DL21, reported
#             on DL20 (05 --interpolate; quality only)
#   margin    margin-MSE on teacher cosine margins (x10) over the pairs of data/distill
#   kl        listwise KL over groups of 8 passages (teacher cosines x20) from the same candidates
#   fused     margin-MSE on the fused teacher (data/distill_fused, FUSION weight) over
#             FUSED_PAIRS (12,288) pairs, to set against the main job's initial model (the same
#             recipe on the plain teacher, runs/main/initial/seen_000012288, evaluated if present)
#   judged    (c): the study's distillation checkpoint at 18,432 pairs + 6,144 pairs of DL21 judged
#             triples, to set against the study's 24,576 distillation pairs (needs runs/study:
#             STUDY_PAIRS=24576 bash recipes/study.sh; skipped without it)
# THREADS (default 1) per process: the arms are independent and may run two at a time.
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/compare}
PAIRS=${PAIRS:-6144}
FUSION=${FUSION:-0.8}
FUSED_PAIRS=${FUSED_PAIRS:-12288}
THREADS=${THREADS:-1}
STUDY=${STUDY:-runs/study}
guard_run "$RUN"
export OMP_NUM_THREADS=$THREADS

[ -f data/distill/teacher_scores.parquet ] || \
  $PY 01_prefetch_passages.py distill --output_dir data/distill --shared "$SHARED" --overwrite
[ -f data/distill/groups.tsv ] || $PY 01_prefetch_passages.py groups --output_dir data/distill
for y in dl20 dl21; do
  $PY 01_prefetch_passages.py json --input "$SHARED/$y/bm25.json" --output data/$y.bm25.candidates.parquet \
    --run_file data/$y.bm25.run --tag bm25 --overwrite
done
RES=(--qrels "$SHARED/dl20/qrels.txt" --candidates data/dl20.bm25.candidates.parquet --topics dl20
     --results "$RUN/results.parquet" --table "$RUN/results.md" --max_length 128 --no_costs)

# fusion: the weight is chosen on DL21 (judged, never evaluated on), then read off on DL20
WEIGHTS="0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9"
$PY 05_eval_trec.py --checkpoint all-MiniLM-L6-v2 --model_kind bi --candidates data/dl21.bm25.candidates.parquet \
  --qrels "$SHARED/dl21/qrels.txt" --topics dl21 --results "$RUN/fusion.parquet" --table "$RUN/fusion.md" \
  --max_length 256 --no_costs --interpolate $WEIGHTS
$PY 05_eval_trec.py --checkpoint all-MiniLM-L6-v2 --model_kind bi --candidates data/dl20.bm25.candidates.parquet \
  --qrels "$SHARED/dl20/qrels.txt" --topics dl20 --results "$RUN/fusion.parquet" --table "$RUN/fusion.md" \
  --max_length 256 --no_costs --interpolate $WEIGHTS

COMMON=(--model_tag all-MiniLM-L6-v2
        --learning_rate 3e-5 --batch_size 32 --max_length 128 --seed 42 --precision bf16 --threads "$THREADS")
MARGIN=(--distill_scale 10)
KL=(--group_size 8 --distill_loss kl --distill_scale 20)
last() { $PY -m common.layout latest "$1"; }

$PY 02_train_initial.py "${COMMON[@]}" --num_training_samples "$PAIRS" --num_checkpoint_samples "$PAIRS" "${MARGIN[@]}" --train_triples_file data/distill/triples.tsv \
  --distill_scores data/distill/teacher_scores.parquet --output_dir "$RUN/margin_mse"
$PY 05_eval_trec.py --checkpoint "$(last "$RUN/margin_mse")" "${RES[@]}"
$PY 02_train_initial.py "${COMMON[@]}" --num_training_samples "$PAIRS" --num_checkpoint_samples "$PAIRS" "${KL[@]}" --train_triples_file data/distill/groups.tsv \
  --distill_scores data/distill/group_scores.parquet --output_dir "$RUN/listwise_kl"
$PY 05_eval_trec.py --checkpoint "$(last "$RUN/listwise_kl")" "${RES[@]}"

# the fused teacher (no re-encoding: re-derived from data/distill's candidates)
[ -f data/distill_fused/teacher_scores.parquet ] || \
  $PY 01_prefetch_passages.py distill --from_set data/distill --fusion_weight "$FUSION" --output_dir data/distill_fused --overwrite
# mean fused margin 0.290 against 0.157 for cosines: x5.4 keeps the margins' scale of x10
$PY 02_train_initial.py "${COMMON[@]}" --num_training_samples "$FUSED_PAIRS" --num_checkpoint_samples "$FUSED_PAIRS" \
  --distill_scale 5.4 --train_triples_file data/distill_fused/triples.tsv \
  --distill_scores data/distill_fused/teacher_scores.parquet --output_dir "$RUN/fused_margin"
$PY 05_eval_trec.py --checkpoint "$(last "$RUN/fused_margin")" "${RES[@]}"
if [ -d runs/main/initial/seen_000012288 ]; then
  $PY 05_eval_trec.py --checkpoint runs/main/initial/seen_000012288 "${RES[@]}"
fi

# (c) distillation then judged triples, at the study's pair count
if [ -d "$STUDY/distill/seen_000018432" ]; then
  $PY 01_prefetch_passages.py json --input "$SHARED/dl21/bm25.json" --output data/dl21.bm25.candidates.parquet --overwrite
  $PY 01_prefetch_passages.py triples --candidates data/dl21.bm25.candidates.parquet \
    --qrels "$SHARED/dl21/qrels.txt" --eval_candidates data/dl20.bm25.candidates.parquet \
    --output data/dl21.judged.triples.tsv --overwrite
  $PY 02_train_initial.py --model_tag "$STUDY/distill/seen_000018432" --train_triples_file data/dl21.judged.triples.tsv \
    --seen_pairs 0 --output_dir "$RUN/judged" --num_training_samples 6144 --num_checkpoint_samples 6144 \
    --learning_rate 1e-5 --max_length 128 --batch_size 32 --seed 42 --precision bf16 --threads "$THREADS"
  $PY 05_eval_trec.py --checkpoint "$(last "$RUN/judged")" "${RES[@]}"
  $PY 05_eval_trec.py --checkpoint "$STUDY/distill/seen_000024576" "${RES[@]}"
fi
cat "$RUN/fusion.md" "$RUN/results.md"
