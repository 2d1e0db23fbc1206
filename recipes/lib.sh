# Shared preamble of the recipes (sourced): environment, paths, the run-dir guard.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash recipes/setup.sh
PY=.venv/bin/python
export PYTHONPATH=.
SHARED=${SHARED:-../shared/data/trec-dl}

# guard_run DIR: refuse an existing run dir unless OVERWRITE=1 (then remove it)
guard_run() {
  if [ "${OVERWRITE:-0}" = 1 ]; then rm -rf "$1"; fi
  if [ -e "$1" ]; then echo "error: $1 exists (OVERWRITE=1 to replace it)" >&2; exit 1; fi
}

# stage_state DIR END: where a stage writing checkpoints to DIR stands, for a run that goes on (`continue`):
# "done" when DIR holds its last checkpoint (seen_<END>_...), else DIR's latest checkpoint (resume from it),
# else "start"
stage_state() { $PY -m common.layout state "$1" "$2"; }

# seen_of DIR: the pairs of the training stream a checkpoint (or a reshaped model) has seen; 0 for a model without
# a trainer state (a packaged encoder)
seen_of() { $PY -c "import json, sys, pathlib; p = pathlib.Path(sys.argv[1], 'trainer_state.json'); print(json.loads(p.read_text())['seen_pairs'] if p.is_file() else 0)" "$1"; }

# embedded_data DATA: the embedded distillation set (DATA/distill, 20 held-out training-side topics) and the DL20 /
# DL21 BM25 candidates, each made once
embedded_data() {
  [ -f "$1/distill/triples.tsv" ] || $PY 01_prefetch_passages.py distill --output_dir "$1/distill" --shared "$SHARED" --holdout 20
  for year in dl20 dl21; do
    [ -f "$1/$year.bm25.candidates.parquet" ] || $PY 01_prefetch_passages.py json --input "$SHARED/$year/bm25.json" \
      --tag bm25 --output "$1/$year.bm25.candidates.parquet" --run_file "$1/$year.bm25.run"
  done
}

# score_bi ROOT DATA MAX_LENGTH THREADS MODEL...: DL20 and DL21 NDCG@10 (05, torch, no timing) of bi-encoders into
# ROOT/results.parquet and one table ROOT/results.md (both replaced), printed
score_bi() {
  local root=$1 data=$2 max_length=$3 threads=$4; shift 4
  rm -f "$root"/results.parquet "$root"/results.md
  for year in dl20 dl21; do
    $PY 05_eval_trec.py --checkpoint "$@" --model_kind bi --backend torch --no_latency --max_length "$max_length" \
      --threads "$threads" --candidates "$data/$year.bm25.candidates.parquet" --qrels "$SHARED/$year/qrels.txt" \
      --topics "$year" --results "$root/results.parquet" --table "$root/results.md"
  done
  cat "$root/results.md"
}

# main_train_args DATA MAX_LENGTH [SET]: the main job's training arrays. TRAIN: the distillation set SET (default
# DATA/distill_fused, the BM25-fused one), monitored on the 20 held-out training-side topics of DATA/distill
# (GROUP_BY_LENGTH=1: with --group_by_length); PREC: empty, or --precision fp32 where the CPU has no native bf16
# (the configs' bf16 autocast emulated is tens of times slower; said once)
main_train_args() {
  local set=${3:-$1/distill_fused}
  TRAIN=(--train_triples_file "$set/triples.tsv" --distill_scores "$set/teacher_scores.parquet"
         --max_length "$2" --eval_candidates_file "$1/distill/holdout.candidates.parquet"
         --eval_qrels_file "$1/distill/holdout.qrels.txt")
  [ "${GROUP_BY_LENGTH:-0}" = 1 ] && TRAIN+=(--group_by_length)
  PREC=()
  if ! $PY -c "import sys; from common.hardware import cpu_has_native_bf16 as f; sys.exit(f() is False)"; then
    echo "note: this CPU has no native bf16: the training stages run with --precision fp32"
    PREC=(--precision fp32)
  fi
}
