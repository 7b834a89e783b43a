#!/usr/bin/env bash
# Build llama-cpp-python from the PyPI sdist (compiles llama.cpp with cmake, CPU only,
# native ISA) into its own venv under .cache/bench. Several minutes on 2 cores. Idempotent.
set -euo pipefail
. "$(dirname "$0")/_venv.sh"
new_venv llamacpp "import llama_cpp"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
"$VENV/bin/pip" install --no-binary llama-cpp-python --no-cache-dir -v llama-cpp-python psutil numpy
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
