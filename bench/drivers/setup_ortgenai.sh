#!/usr/bin/env bash
# onnxruntime-genai + its model builder (needs transformers 5.x, torch CPU) in its own venv.
# matplotlib for the plot lives here too (not a runtime dependency of edged). Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${EDGED_BENCH_CACHE:-$ROOT/.cache/bench}"
VENV="$CACHE/venv-ortgenai"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import onnxruntime_genai, transformers, matplotlib" 2>/dev/null; then
  echo "onnxruntime-genai already in $VENV"; exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch: CPU build (pip's configured wheel directory has one; PyPI's default pulls CUDA)
"$VENV/bin/pip" install -q "torch==$("$ROOT/.venv/bin/python" -c 'import torch;print(torch.__version__)' 2>/dev/null || echo 2.13.0+cpu)" \
  || "$VENV/bin/pip" install -q torch
"$VENV/bin/pip" install -q onnxruntime-genai onnxruntime onnx "transformers>=5" psutil numpy matplotlib onnx_ir
"$VENV/bin/python" -c "import onnxruntime_genai as og, transformers; print('onnxruntime-genai', og.__version__, 'transformers', transformers.__version__)"
