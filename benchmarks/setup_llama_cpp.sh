#!/usr/bin/env bash
# Build llama.cpp's OpenAI-compatible server (llama-cpp-python) into its own venv, for
# benchmarks/bench_server.py only. It is never a dependency of tokenloom.
#
#   nice -n 19 bash benchmarks/setup_llama_cpp.sh          # creates benchmarks/.venv-llama
#   benchmarks/.venv-llama/bin/python -m llama_cpp.server --help
#
# llama-cpp-python is installed from the PyPI sdist, which compiles llama.cpp (CPU only,
# OpenMP, -march=native) with at most 2 parallel jobs. Takes several minutes on 2 cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${LLAMA_VENV:-$HERE/.venv-llama}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip

if "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already in $VENV"
else
    start=$(date +%s)
    # CPU-only, native ISA; skip what the server does not need (tests, examples, tools, curl).
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF}"
    export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" MAKEFLAGS="-j$JOBS"
    "$VENV/bin/python" -m pip install --no-binary llama-cpp-python --no-cache-dir \
        "llama-cpp-python[server]==$VERSION"
    echo "built llama-cpp-python $VERSION in $(( $(date +%s) - start )) s"
fi
"$VENV/bin/python" -m llama_cpp.server --help >/dev/null
echo "ok: $VENV/bin/python -m llama_cpp.server"
