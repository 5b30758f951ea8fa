#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with chatlm (editable) and its test tools.
#   bash launch/setup.sh            # torch==2.13.0 unless torch is already importable
#   TORCH_SPEC="torch==2.11.0" bash launch/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch (or one pulled in by a dependency) can resolve to a
# multi-GB CUDA build where a CPU wheel was wanted.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import chatlm, torch, hydra; print(f'chatlm {chatlm.__version__} | torch {torch.__version__} | hydra {hydra.__version__}')"
