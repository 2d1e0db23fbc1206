#!/usr/bin/env bash
# Dense first stage on the embedded data, and hard negatives from it.
# 1. The retrieval study (bench/dense_study.py): BM25 (pyserini) and the packaged all-MiniLM-L6-v2
#    bi-encoder (plus any ENCODERS) over every distinct passage of the shared DL20/DL21/DL22
#    first-stage lists (31,766 passages), DL20's topics as queries (never trained on), top 1000:
#    NDCG@10, R@100, R@1000, index build time, speed-up and size -> results/dense/README.md.
#    Each encoder's index is kept in $RUN/index/ and reused by a rerun.
# 2. Hard negatives as the BGE-M3 seeds mine them (hn_mine: ranks 2-200, 7 negatives): the
#    packaged encoder's top 200 of the DL21 topics from the same index, then 01 mine.
#   ENCODERS   bi-encoders, one row each (default: all-MiniLM-L6-v2); add pruned ones, e.g.
#              ENCODERS="all-MiniLM-L6-v2 runs/bi/recover/final"
#   ASYMMETRIC PASSAGE_ENCODER=QUERY_ENCODER rows, e.g. "runs/bi/recover/final=all-MiniLM-L6-v2"
#   THREADS (2), MAX_LENGTH (256), TABLE (results/dense/README.md)
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/dense}
ENCODERS=${ENCODERS:-all-MiniLM-L6-v2}
ASYMMETRIC=${ASYMMETRIC:-}
THREADS=${THREADS:-2}
MAX_LENGTH=${MAX_LENGTH:-256}
TABLE=${TABLE:-results/dense/README.md}

# shellcheck disable=SC2086 # ENCODERS and ASYMMETRIC are word lists
$PY bench/dense_study.py --shared "$SHARED" --work_dir "$RUN" --encoders $ENCODERS \
  ${ASYMMETRIC:+--asymmetric $ASYMMETRIC} --threads "$THREADS" --max_length "$MAX_LENGTH" --table "$TABLE"

$PY 01_prefetch_passages.py dense --encoder all-MiniLM-L6-v2 --collection "$RUN/collection.tsv" \
  --queries "$RUN/dl21.queries.tsv" --index "$RUN/index/all-MiniLM-L6-v2" --k 200 \
  --max_length "$MAX_LENGTH" --threads "$THREADS" \
  --output "$RUN/dl21.dense.candidates.parquet" --run_file "$RUN/dl21.dense.run" --overwrite
$PY 01_prefetch_passages.py mine --candidates "$RUN/dl21.dense.candidates.parquet" \
  --qrels "$SHARED/dl21/qrels.txt" --range_for_sampling 2-200 --negative_number 7 \
  --output "$RUN/dl21.dense_mined.tsv" --overwrite
