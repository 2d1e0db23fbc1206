#!/usr/bin/env bash
# openvino-main-1 (results/ship/plan.md): the main job's initial and recovered models on the OpenVINO
# backends. Run after `bash recipes/main.sh`, in the same checkout; writes runs/ov/ (results.md, speedup.txt).
set -euo pipefail
PY=.venv/bin/python
INITIAL=$($PY -m common.layout latest runs/main/initial)
FINAL=$($PY -m common.layout latest runs/main/recover)
echo "initial: $INITIAL recovered: $FINAL"
for pair in "initial:$INITIAL" "recovered:$FINAL"; do
  name=${pair%%:*}; src=${pair#*:}
  $PY 04_reshape.py --checkpoint_dir "$src" --output_dir "runs/ov/$name" --openvino \
    --calibration_triples data/distill_fused/triples.tsv --int8_keep_fp32 ffn_out --max_length 128 --overwrite
done
RES=(--candidates data/dl20.bm25.candidates.parquet --qrels ../shared/data/trec-dl/dl20/qrels.txt --topics dl20
     --results runs/ov/results.parquet --table runs/ov/results.md --max_length 128 --no_latency)
for name in initial recovered; do
  for backend in torch openvino openvino-int8; do
    $PY 05_eval_trec.py --checkpoint "runs/ov/$name" --backend "$backend" "${RES[@]}"
  done
done
$PY bench/speedup.py --baseline "$INITIAL" --candidate runs/ov/initial@openvino --candidate runs/ov/initial@openvino-int8 \
  --candidate runs/ov/recovered@openvino --candidate runs/ov/recovered@openvino-int8 --candidate runs/ov/recovered@onnx-int8 \
  --candidates data/dl20.bm25.candidates.parquet --max_length 128 --queries 3 --rounds 10 | tee runs/ov/speedup.txt
