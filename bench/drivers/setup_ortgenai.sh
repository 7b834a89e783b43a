#!/usr/bin/env bash
# onnxruntime-genai + its model builder (needs transformers 5.x, torch CPU) in its own venv.
# matplotlib for the plot lives here too (not a runtime dependency of edged). Idempotent.
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
new_venv ortgenai "import onnxruntime_genai, transformers, matplotlib"
# torch: CPU build (pip's configured wheel directory has one; PyPI's default pulls CUDA)
"$VENV/bin/pip" install -q "torch==$("$ROOT/.venv/bin/python" -c 'import torch;print(torch.__version__)' 2>/dev/null || echo 2.13.0+cpu)" \
  || "$VENV/bin/pip" install -q torch
"$VENV/bin/pip" install -q onnxruntime-genai onnxruntime onnx "transformers>=5" psutil numpy matplotlib onnx_ir
"$VENV/bin/python" -c "import onnxruntime_genai as og, transformers; print('onnxruntime-genai', og.__version__, 'transformers', transformers.__version__)"
