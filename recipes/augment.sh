#!/usr/bin/env bash
# The augmentation curve (issue #37, results/augment/plan.md): does text made from the training-side
# passages (pseudo-queries: crops, inverse-cloze sentences, keywords; 01_prefetch_passages.py augment)
# carry a pruned bi-encoder past the data it has, as real queries would?
#
#   bash recipes/augment.sh data     # data/augment/pseudo (pseudo-queries over data/distill's passages, never
#                                    # a DL20 candidate; its BM25 and teacher), mixed with the real stream:
#                                    # data/augment/mix_1x (6,144 real + 6,144 pseudo), mix_3x (+ 18,432);
#                                    # data/augment/pseudo_big (2,800 pseudo-queries, made alike) for
#                                    # mix_7x (6,144 real + 43,008 pseudo); data/augment/pseudo_7k (7,000
#                                    # pseudo-queries, seed 7) for mix_all (the whole real stream + all of
#                                    # it); with the main job's BM25-fused teacher, pseudo_7k_fused and
#                                    # mix_all_fused (the cross-encoder's: data/distill_fused + pseudo_7k_fused)
#   bash recipes/matched_cost.sh recipes/config/augment/aug_1x.toml activation   # also aug_3x, aug_7x, aug_all
#   bash recipes/augment.sh report   # DL20 / DL21 NDCG@10 of the packaged encoder, the 0x point (run 11:
#                                    # recipes/config/matched_cost/bi_3x_quarter.toml) and each arm
#
# The real stream is data/distill/triples.tsv; its first 6,144 triples are what run 11 trained on.
source "$(dirname "$0")/lib.sh"
ACTION=${1:?usage: bash recipes/augment.sh data|report}
DATA=data; OUT=data/augment; ROOT=runs/augment
REAL=6144
case "$ACTION" in
  data)
    embedded_data "$DATA"
    for set in pseudo:1300:42 pseudo_big:2800:42 pseudo_7k:7000:7; do
      IFS=: read -r name queries seed <<< "$set"
      [ -f "$OUT/$name/triples.tsv" ] || $PY 01_prefetch_passages.py augment --from_set "$DATA/distill" \
        --output_dir "$OUT/$name" --num_queries "$queries" --seed "$seed"
    done
    for mix in 1:pseudo 3:pseudo 7:pseudo_big; do
      times=${mix%%:*}
      [ -f "$OUT/mix_${times}x/triples.tsv" ] || $PY 01_prefetch_passages.py mix --sets "$DATA/distill" "$OUT/${mix#*:}" \
        --take "$REAL" $(( times * REAL )) --output_dir "$OUT/mix_${times}x"
    done
    [ -f "$OUT/mix_all/triples.tsv" ] || $PY 01_prefetch_passages.py mix --sets "$DATA/distill" "$OUT/pseudo_7k" \
      --output_dir "$OUT/mix_all"
    # the cross-encoder's stream (the main job's BM25-fused teacher, recipes/main.sh): the fused real set and the
    # fused pseudo_7k, shuffled into mix_all_fused (results/latency/plan.md, run latency-6)
    [ -f "$DATA/distill_fused/teacher_scores.parquet" ] || $PY 01_prefetch_passages.py distill --from_set "$DATA/distill" \
      --fusion_weight 0.8 --output_dir "$DATA/distill_fused"
    [ -f "$OUT/pseudo_7k_fused/teacher_scores.parquet" ] || $PY 01_prefetch_passages.py distill \
      --from_set "$OUT/pseudo_7k" --fusion_weight 0.8 --seed 7 --output_dir "$OUT/pseudo_7k_fused"
    [ -f "$OUT/mix_all_fused/triples.tsv" ] || $PY 01_prefetch_passages.py mix --sets "$DATA/distill_fused" \
      "$OUT/pseudo_7k_fused" --output_dir "$OUT/mix_all_fused" ;;
  report)
    mapfile -t FINALS < <(for f in runs/matched_3x_quarter/bi_activation_3x/final.txt "$ROOT"/aug_*/bi_activation_3x/final.txt; do
      [ -f "$f" ] && cat "$f"; done)
    [ ${#FINALS[@]} -gt 0 ] || { echo "error: no finished arm (runs/matched_3x_quarter, $ROOT/aug_*)" >&2; exit 1; }
    mkdir -p "$ROOT"
    score_bi "$ROOT" "$DATA" 128 2 all-MiniLM-L6-v2 "${FINALS[@]}" ;;
  *) echo "error: the action must be data or report, got $ACTION" >&2; exit 1 ;;
esac
