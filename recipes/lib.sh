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
