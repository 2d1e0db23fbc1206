#!/usr/bin/env bash
# The latency study (results/latency/plan.md): the main job's initial model pruned to a predicted
# serving time on the host's fastest backend, at the main job's budget (recipes/config/main: 10,240
# pruning pairs, 8,192 recovery pairs, the same loss and data), then shipped for OpenVINO and scored.
# Run in a checkout where `bash recipes/main.sh` has run (runs/main):
#
#   bash recipes/latency_main.sh 0.5      # runs/latency_main/ratio_0.5: 03c -> 04 -> recover -> ship -> DL20
#   bash recipes/latency_main.sh 0.33
#   RECOVERY_PAIRS=32768 bash recipes/latency_main.sh 0.5
#                                         # runs/latency_main/ratio_0.5_recover_32768: recovered 4x longer;
#                                         # with PRUNED_FROM=runs/latency_main/ratio_0.5, from that arm's
#                                         # pruned model (no new pruning stage)
#   PRUNE_PAIRS=40960 PRUNE_CYCLES=8 RECOVERY_PAIRS=65536 bash recipes/latency_main.sh 0.5
#                                         # runs/latency_main/ratio_0.5_prune_40960x8_recover_65536: gradual
#                                         # pruning (8 events over 4x the pairs; the config's 4 events otherwise)
#   TRAIN_SET=data/augment/mix_all_fused ... bash recipes/latency_main.sh 0.5
#                                         # another distillation set as the training stream (the run dir ends
#                                         # _mix_all_fused); the held-out monitor stays DATA/distill's
#   bash recipes/latency_main.sh 0.5 continue
#                                         # go on with a stopped arm (the same variables): a finished stage is
#                                         # kept, a stopped one resumed exactly from its latest checkpoint (a
#                                         # killed stage leaves a lock: the error line says what to remove)
#   RECOVERY_PAIRS=32768 bash recipes/latency_main.sh depth 3
#                                         # runs/latency_main/depth_3_recover_32768: the depth arm (Minitron's other
#                                         # axis): the initial model's first 3 layers (04 --keep_layers), recovered
#                                         # on PRUNE_PAIRS + RECOVERY_PAIRS pairs (what a width arm trains after 02)
#   bash recipes/latency_main.sh report   # ships the unpruned and the MAC-target model (the main job's) as the
#                                         # arms are shipped; one benchmark per backend: every model over the
#                                         # unpruned one on OpenVINO (against TABLE), on openvino-int8 (against
#                                         # OV_INT8_TABLE) and on onnx-int8 (against ONNX_TABLE), each where its
#                                         # table exists, and over the unpruned one in torch fp32
#
# 03c reads the table TABLE (default results/latency/openvino_epyc.json: this AMD EPYC host; another table's arms are
# named after it, e.g. ratio_0.5_openvino-int8_epyc); DL20 is scored
# once per model and backend (torch fp32, openvino, openvino-int8) into runs/latency_main/results.md.
source "$(dirname "$0")/lib.sh"
ARG=${1:?usage: bash recipes/latency_main.sh RATIO [continue]|depth LAYERS|report}
ROOT=runs/latency_main; DATA=${DATA:-data}; MAX_LENGTH=128
CONTINUE=0
if [ "$ARG" != depth ]; then
  case "${2:-}" in "") CONTINUE=0 ;; continue) CONTINUE=1 ;;
    *) echo "error: the second argument may only be 'continue' (go on with a stopped arm), got $2" >&2; exit 1 ;; esac
fi
TRAIN_SET=${TRAIN_SET:-$DATA/distill_fused}
for f in triples.tsv teacher_scores.parquet; do
  [ -f "$TRAIN_SET/$f" ] || { echo "error: TRAIN_SET=$TRAIN_SET: no $f there (a distillation set dir)" >&2; exit 1; }
done
TABLE=${TABLE:-results/latency/openvino_epyc.json}
ONNX_TABLE=${ONNX_TABLE:-results/latency/onnx-int8-ffn_out_epyc.json}
OV_INT8_TABLE=${OV_INT8_TABLE:-results/latency/openvino-int8_epyc.json}
PRUNE_PAIRS=${PRUNE_PAIRS:-10240}; RECOVERY_PAIRS=${RECOVERY_PAIRS:-8192}; PRUNE_CYCLES=${PRUNE_CYCLES:-}
for v in PRUNE_PAIRS RECOVERY_PAIRS ${PRUNE_CYCLES:+PRUNE_CYCLES}; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $v must be a positive integer, got ${!v}" >&2; exit 1; }
done
latest() { $PY -m common.layout latest "$1"; }
INITIAL=$(latest runs/main/initial)
CAND=(--candidates "$DATA/dl20.bm25.candidates.parquet" --max_length "$MAX_LENGTH" --queries 3 --rounds 10 --threads 2)
# ship SRC DIR: every model of the study shipped alike: ONNX fp32 / int8 (FFN output in fp32) and OpenVINO IR /
# NNCF int8 IR, calibrated on training-side triples
ship() {
  [ -f "$2/openvino/openvino_model_qint8_quantized.xml" ] || $PY 04_reshape.py --checkpoint_dir "$1" --output_dir "$2" \
    --openvino --calibration_triples "$DATA/distill_fused/triples.tsv" --int8_keep_fp32 ffn_out --max_length "$MAX_LENGTH"
}

# recover_ship_score RUN START PAIRS: recover START (a reshaped model) on PAIRS pairs distilling the initial model
# (a run that goes on resumes RUN/recover's latest checkpoint, or skips a finished stage), ship the last checkpoint
# as RUN/final, score it on DL20 once per backend (RUN/scored.txt says it was)
recover_ship_score() {
  local state from=(--checkpoint_dir "$2")
  state=$(stage_state "$1/recover" $(( $(seen_of "$2") + $3 )))
  [ "$state" = start ] || [ "$state" = done ] || from=(--checkpoint_dir "$state" --resume)
  [ "$state" = done ] || $PY 02_train_initial.py --stage recover --config recipes/config/main/recover.toml \
    "${from[@]}" --distill_from "$INITIAL" --output_dir "$1/recover" \
    --num_training_samples "$3" --num_checkpoint_samples $(( $3 / 2 )) "${TRAIN[@]}" "${PREC[@]}"
  ship "$(latest "$1/recover")" "$1/final"
  [ ! -f "$1/scored.txt" ] || { echo "note: $1/final was scored on DL20 before ($1/scored.txt): not again"; return; }
  local res=(--candidates "$DATA/dl20.bm25.candidates.parquet" --qrels "$SHARED/dl20/qrels.txt" --topics dl20
             --results "$ROOT/results.parquet" --table "$ROOT/results.md" --max_length "$MAX_LENGTH" --no_latency)
  for backend in torch openvino openvino-int8; do
    $PY 05_eval_trec.py --checkpoint "$1/final" --backend "$backend" "${res[@]}"
  done
  date -u +"%Y-%m-%dT%H:%M:%SZ" > "$1/scored.txt"
}

if [ "$ARG" = report ]; then
  mapfile -t SHIPPED < <(for d in "$ROOT"/ratio_*/final "$ROOT"/depth_*/final; do [ -d "$d/openvino" ] && echo "$d"; done)
  [ ${#SHIPPED[@]} -gt 0 ] || { echo "error: no shipped model in $ROOT/ratio_*/final or $ROOT/depth_*/final" >&2; exit 1; }
  ship "$INITIAL" "$ROOT/unpruned"
  ship "$(latest runs/main/recover)" "$ROOT/mac_target"
  OV=(); OV8=(); ONNX=(); ALL=(--candidate "$ROOT/unpruned@openvino" --candidate "$ROOT/unpruned@openvino-int8")
  for d in "$ROOT/mac_target" "${SHIPPED[@]}"; do
    OV+=(--candidate "$d@openvino"); OV8+=(--candidate "$d@openvino-int8"); ONNX+=(--candidate "$d@onnx-int8")
    ALL+=(--candidate "$d@openvino" --candidate "$d@openvino-int8")
  done
  { echo "== on OpenVINO: over the unpruned model on OpenVINO (the peer), against $TABLE"
    $PY bench/speedup.py --baseline "$ROOT/unpruned@openvino" "${OV[@]}" "${CAND[@]}" --latency_table "$TABLE"
    if [ -f "$OV_INT8_TABLE" ]; then
      echo "== on openvino-int8: over the unpruned model on openvino-int8, against $OV_INT8_TABLE"
      $PY bench/speedup.py --baseline "$ROOT/unpruned@openvino-int8" "${OV8[@]}" "${CAND[@]}" --latency_table "$OV_INT8_TABLE"
    fi
    if [ -f "$ONNX_TABLE" ]; then
      echo "== on onnx-int8: over the unpruned model on onnx-int8, against $ONNX_TABLE"
      $PY bench/speedup.py --baseline "$ROOT/unpruned@onnx-int8" "${ONNX[@]}" "${CAND[@]}" --latency_table "$ONNX_TABLE"
    fi
    echo "== over the unpruned model in torch fp32"
    $PY bench/speedup.py --baseline "$INITIAL" "${ALL[@]}" "${CAND[@]}"
  } | tee "$ROOT/speedup.txt"
  cat "$ROOT/results.md"
  exit 0
fi

if [ "$ARG" = depth ]; then
  KEEP=${2:?usage: bash recipes/latency_main.sh depth LAYERS}
  RUN="$ROOT/depth_$KEEP"; [ "$RECOVERY_PAIRS" = 8192 ] || RUN="${RUN}_recover_$RECOVERY_PAIRS"
  guard_run "$RUN"
  main_train_args "$DATA" "$MAX_LENGTH"
  $PY 04_reshape.py --checkpoint_dir "$INITIAL" --keep_layers "$KEEP" --output_dir "$RUN/dropped" --max_length "$MAX_LENGTH"
  recover_ship_score "$RUN" "$RUN/dropped" $(( PRUNE_PAIRS + RECOVERY_PAIRS ))
  echo "== depth $KEEP done: $RUN/final"
  exit 0
fi

RATIO=$ARG
$PY -c "import sys; r = float(sys.argv[1]); sys.exit(not 0 < r < 1)" "$RATIO" 2>/dev/null || \
  { echo "error: the ratio must be a number in (0, 1), or 'depth LAYERS' or 'report', got $ARG" >&2; exit 1; }
RUN="$ROOT/ratio_$RATIO"
[ "$TABLE" = results/latency/openvino_epyc.json ] || RUN="${RUN}_$(basename "$TABLE" .json)"  # another table's shape
CYCLES=()
[ -z "$PRUNE_CYCLES" ] || CYCLES=(--num_prune_cycles "$PRUNE_CYCLES")
if [ "$PRUNE_PAIRS" != 10240 ] || [ -n "$PRUNE_CYCLES" ]; then  # a pruning stage other than the config's
  [ -z "${PRUNED_FROM:-}" ] || { echo "error: PRUNE_PAIRS/PRUNE_CYCLES set a pruning stage, PRUNED_FROM reuses one: give one" >&2; exit 1; }
  RUN="${RUN}_prune_${PRUNE_PAIRS}x${PRUNE_CYCLES:-4}"
fi
[ "$RECOVERY_PAIRS" = 8192 ] || RUN="${RUN}_recover_$RECOVERY_PAIRS"
[ "$TRAIN_SET" = "$DATA/distill_fused" ] || RUN="${RUN}_$(basename "$TRAIN_SET")"  # another training stream
[ "$CONTINUE" = 1 ] || guard_run "$RUN"
main_train_args "$DATA" "$MAX_LENGTH" "$TRAIN_SET"
if [ -n "${PRUNED_FROM:-}" ]; then  # the pruning stage of another arm at this ratio
  $PY -c "import json, sys; sys.exit(not any(e.get('event') == 'latency_shape' and e['target_latency_ratio'] == float(sys.argv[2])
    for e in map(json.loads, open(sys.argv[1]))))" "$PRUNED_FROM/mixed/metrics.jsonl" "$RATIO" 2>/dev/null || \
    { echo "error: PRUNED_FROM=$PRUNED_FROM: no pruning stage to ratio $RATIO there" >&2; exit 1; }
  mkdir -p "$RUN"; [ -e "$RUN/mixed" ] || ln -s "$(realpath "$PRUNED_FROM/mixed")" "$RUN/mixed"
else  # continue: resume the stage from its latest checkpoint, or skip it when it finished
  STATE=$(stage_state "$RUN/mixed" $(( $(seen_of "$INITIAL") + PRUNE_PAIRS )))
  FROM=(initial --checkpoint_dir "$INITIAL")
  [ "$STATE" = start ] || [ "$STATE" = done ] || FROM=(continue --checkpoint_dir "$STATE")
  [ "$STATE" = done ] || $PY 03c_prune_mixed.py "${FROM[@]}" --config recipes/config/latency/prune.toml \
    --latency_table "$TABLE" --target_latency_ratio "$RATIO" --distill_from "$INITIAL" --output_dir "$RUN/mixed" \
    --num_training_samples "$PRUNE_PAIRS" --num_checkpoint_samples $(( PRUNE_PAIRS / 4 )) "${CYCLES[@]}" "${TRAIN[@]}" "${PREC[@]}"
fi
PRUNED=$(latest "$RUN/mixed")
[ -f "$PRUNED/reshaped/pruning.json" ] || $PY 04_reshape.py --checkpoint_dir "$PRUNED"
recover_ship_score "$RUN" "$PRUNED/reshaped" "$RECOVERY_PAIRS"
echo "== ratio $RATIO done: $RUN/final"
