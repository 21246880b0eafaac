#!/usr/bin/env bash
# Install intruder and what its demo and tests need into the current Python environment.
# torch: a CPU build is enough; where a local torch 2.13.0 wheel is offered (these machines), use
# it rather than letting pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0" 2>/dev/null || "$PY" -m pip install -q "torch>=2.1"
fi
"$PY" -m pip install -q -e ".[test]"
