#!/usr/bin/env bash
# Create .venv and install the pinned packages (torch first, alone, from its CPU build).
# Idempotent: re-running with unchanged requirements files does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.slimrank-$(cat requirements.txt requirements-first-stage.txt 2>/dev/null | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -r requirements.txt
  if [ -f requirements-first-stage.txt ]; then
    .venv/bin/python -m pip install -q --no-deps -r requirements-first-stage.txt
  fi
  touch "$stamp"
fi
