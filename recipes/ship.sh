#!/usr/bin/env bash
# Shipping (issue #18): every backend x model (unpruned / pruned), cross-encoder and bi-encoder,
# on DL20 (quality + latency, 100 BM25 candidates per query, real lengths) and DL21 (quality),
# then one alternating benchmark per speed claim.
#   cross: the main job's initial (unpruned) and recovered (pruned) cross-encoders, from MAIN
#          (default runs/main: run `bash recipes/main.sh` first), exported as they are (04 --onnx);
#   bi:    the packaged all-MiniLM-L6-v2 encoder and a pruned one: the bi-encoder demo's pruning
#          stage (03c, all six layers to 36 heads and FFN 640 in total, activation importance,
#          embeddings distilled from the unpruned encoder) shortened to BI_PAIRS pairs, no recovery,
#          trained at PRECISION (fp32; bf16 autocast only on a CPU with native bf16);
#          or BI_PRUNED=<dir>, a pruned and recovered encoder (e.g. an arm of recipes/matched_cost.sh:
#          BI_PRUNED=$(cat runs/matched/bi_reference_3x/final.txt)), exported as it is.
# KINDS (default "cross bi"): the model kinds to ship (KINDS=bi needs no main job).
# Backends (common.serving.rank): torch fp32, torch bf16 autocast, onnxruntime fp32, onnxruntime int8
# (dynamic, per-channel weights, MatMul only). Everything at THREADS threads (2), MAX_LENGTH 128.
# Outputs: $RUN/ (exported model dirs, results*.parquet/md, speedup.txt).
# EVAL_ONLY=1: reuse the models of an earlier run in $RUN (no build), evaluate BACKENDS on DL20
# and DL21_BACKENDS on DL21 (default: all four each), then the benchmarks.
# BENCHMARKS=0: no benchmarks (when other jobs share the cores); BENCHMARKS=only: only the benchmarks of
# the models already in $RUN (on a quiet machine).
source "$(dirname "$0")/lib.sh"
RUN=${RUN:-runs/ship}
MAIN=${MAIN:-runs/main}
BI_PAIRS=${BI_PAIRS:-8192}
PRECISION=${PRECISION:-fp32}
THREADS=${THREADS:-2}
MAX_LENGTH=${MAX_LENGTH:-128}
if [ "${SMOKE:-0}" = 1 ]; then
  RUN=${RUN_SMOKE:-runs/ship_smoke}; BI_PAIRS=256; EVAL=(--max_queries 3); TIMING=(--repeats 1 --latency_queries 1)
  BENCH=(--queries 1 --rounds 2)
else
  EVAL=(); TIMING=(--repeats 3 --latency_queries 10); BENCH=(--queries 5 --rounds 5)
fi
BACKENDS=${BACKENDS-torch torch-bf16 onnx onnx-int8}
DL21_BACKENDS=${DL21_BACKENDS-$BACKENDS}
KINDS=${KINDS:-cross bi}
has() { [[ " $KINDS " == *" $1 "* ]]; }
for kind in $KINDS; do
  case "$kind" in cross|bi) ;; *) echo "error: KINDS: unknown kind '$kind' (cross, bi)" >&2; exit 1 ;; esac
done
if [ -n "${BI_PRUNED:-}" ] && [ ! -d "$BI_PRUNED" ]; then echo "error: BI_PRUNED: no model dir $BI_PRUNED" >&2; exit 1; fi
latest() { $PY -m common.layout latest "$1"; }
BENCHMARKS=${BENCHMARKS:-1}
case "$BENCHMARKS" in 0|1|only) ;; *) echo "error: BENCHMARKS must be 0, 1 or only, got $BENCHMARKS" >&2; exit 1 ;; esac
if [ "$BENCHMARKS" = only ]; then EVAL_ONLY=1; BACKENDS=""; DL21_BACKENDS=""; fi
if [ "${EVAL_ONLY:-0}" != 1 ]; then
guard_run "$RUN"
mkdir -p "$RUN"
if has cross; then
  CROSS_UNPRUNED=${CROSS_UNPRUNED:-$(latest "$MAIN/initial")}
  CROSS_PRUNED=${CROSS_PRUNED:-$(latest "$MAIN/recover")}
fi

for year in dl20 dl21; do
  $PY 01_prefetch_passages.py json --input "$SHARED/$year/bm25.json" --tag bm25 "${EVAL[@]}" \
    --output "$RUN/$year.bm25.candidates.parquet" --run_file "$RUN/$year.bm25.run"
done
[ -f data/distill/triples.tsv ] || $PY 01_prefetch_passages.py distill --output_dir data/distill --holdout 20

# the models, exported (04 --onnx: onnx/model.onnx, onnx/model_int8.onnx beside the weights)
if has cross; then
  $PY 04_reshape.py --checkpoint_dir "$CROSS_UNPRUNED" --output_dir "$RUN/cross_unpruned" --onnx --int8_keep_fp32 ffn_out --max_length "$MAX_LENGTH"
  $PY 04_reshape.py --checkpoint_dir "$CROSS_PRUNED" --output_dir "$RUN/cross_pruned" --onnx --int8_keep_fp32 ffn_out --max_length "$MAX_LENGTH"
fi
if has bi; then
  $PY 04_reshape.py --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi --output_dir "$RUN/bi_unpruned" --onnx --int8_keep_fp32 ffn_out --max_length "$MAX_LENGTH"
  if [ -z "${BI_PRUNED:-}" ]; then
    $PY 03c_prune_mixed.py initial --checkpoint_dir all-MiniLM-L6-v2 --model_kind bi \
      --train_triples_file data/distill/triples.tsv --output_dir "$RUN/bi_mixed" \
      --distill_from all-MiniLM-L6-v2 --distill_target embeddings --distill_weight 1 --contrastive_weight 0 \
      --importance activation --exclude_layers "" \
      --num_training_samples "$BI_PAIRS" --num_checkpoint_samples $(( BI_PAIRS / 4 )) --num_prune_cycles 6 \
      --target_heads 36 --target_ffn 640 --learning_rate 1e-4 --batch_size 32 --max_length "$MAX_LENGTH" \
      --seed 42 --threads "$THREADS" --precision "$PRECISION" --eval_candidates_file data/distill/holdout.candidates.parquet \
      --eval_qrels_file data/distill/holdout.qrels.txt
    BI_PRUNED=$(latest "$RUN/bi_mixed")
  fi
  $PY 04_reshape.py --checkpoint_dir "$BI_PRUNED" --output_dir "$RUN/bi_pruned" --onnx --int8_keep_fp32 ffn_out --max_length "$MAX_LENGTH"
fi
fi

# quality and latency of every (model, backend)
for backend in $BACKENDS; do
  for kind in $KINDS; do
    $PY 05_eval_trec.py --checkpoint "$RUN/${kind}_unpruned" "$RUN/${kind}_pruned" --backend "$backend" \
      --candidates "$RUN/dl20.bm25.candidates.parquet" --qrels "$SHARED/dl20/qrels.txt" --topics dl20 \
      --results "$RUN/results_$kind.parquet" --table "$RUN/results_$kind.md" \
      --max_length "$MAX_LENGTH" --threads "$THREADS" "${TIMING[@]}"
  done
done
for backend in $DL21_BACKENDS; do
  for kind in $KINDS; do
    $PY 05_eval_trec.py --checkpoint "$RUN/${kind}_unpruned" "$RUN/${kind}_pruned" --backend "$backend" \
      --candidates "$RUN/dl21.bm25.candidates.parquet" --qrels "$SHARED/dl21/qrels.txt" --topics dl21 \
      --results "$RUN/results_${kind}_dl21.parquet" --table "$RUN/results_${kind}_dl21.md" \
      --max_length "$MAX_LENGTH" --threads "$THREADS" --no_costs
  done
done

[ "$BENCHMARKS" = 0 ] && { cat "$RUN"/results_*.md; exit 0; }
# one benchmark per claim: alternating rounds in one process, real DL20 lengths
B=(--candidates "$RUN/dl20.bm25.candidates.parquet" --max_length "$MAX_LENGTH" --threads "$THREADS" "${BENCH[@]}")
{
  CROSS_PAIRS=(); BI_PAIRS_=()
  has cross && CROSS_PAIRS=("cross_pruned@torch cross_pruned@onnx-int8" "cross_unpruned@torch cross_pruned@onnx-int8"
                            "cross_pruned@torch cross_pruned@torch-bf16" "cross_unpruned@torch cross_unpruned@onnx-int8")
  has bi && BI_PAIRS_=("bi_pruned@torch bi_pruned@onnx-int8" "bi_unpruned@torch bi_pruned@onnx-int8")
  for pair in "${CROSS_PAIRS[@]}"; do
    set -- $pair
    echo "== $1 -> $2"
    $PY bench/speedup.py --baseline "$RUN/$1" --candidate "$RUN/$2" "${B[@]}"
  done
  for pair in "${BI_PAIRS_[@]}"; do
    set -- $pair
    echo "== $1 -> $2 (passage encoding)"
    $PY bench/speedup.py --baseline "$RUN/$1" --candidate "$RUN/$2" --encode "${B[@]}"
  done
} | tee "$RUN/speedup.txt"
cat "$RUN"/results_*.md
