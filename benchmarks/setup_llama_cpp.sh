#!/usr/bin/env bash
# Build llama.cpp (llama-cpp-python, with its OpenAI-compatible server) into its own venv, for
# the benchmarks only (`tokenloom bench`, benchmarks/bench_server.py). It is never a dependency
# of tokenloom.
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

# -march=native code dies with SIGILL on a CPU without the build machine's extensions, so the
# build records the CPU flags it was made for and a venv carried to another CPU is rebuilt.
CPU="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-16 || true)-noamx"
if "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null \
    && [ "$(cat "$VENV/.built-for-cpu" 2>/dev/null)" = "$CPU" ]; then
    echo "llama-cpp-python $VERSION already in $VENV"
else
    start=$(date +%s)
    # CPU-only, native ISA; skip what the server does not need (tests, examples, tools, curl).
    export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DLLAVA_BUILD=OFF}"
    export CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" MAKEFLAGS="-j$JOBS"
    # Without AMX: where the CPU reports it but the sandbox has no tile state (seen here on a
    # Xeon with amx_int8), ggml's AMX product dies with SIGILL at its first tilezero. An
    # explicit -mno-* wins over -march=native whatever the order.
    if echo | "${CC:-cc}" -mno-amx-tile -E - >/dev/null 2>&1; then
        export CFLAGS="${CFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        export CXXFLAGS="${CXXFLAGS:-} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    fi
    "$VENV/bin/python" -m pip install --no-binary llama-cpp-python --no-cache-dir \
        --force-reinstall --no-deps "llama-cpp-python==$VERSION"
    "$VENV/bin/python" -m pip install -q "llama-cpp-python[server]==$VERSION"
    echo "$CPU" > "$VENV/.built-for-cpu"
    echo "built llama-cpp-python $VERSION in $(( $(date +%s) - start )) s"
fi
# gguf (llama.cpp's own reader) gives the runner the token embedding table for its floor row
"$VENV/bin/python" -m pip install -q gguf
"$VENV/bin/python" -m llama_cpp.server --help >/dev/null
echo "ok: $VENV/bin/python -m llama_cpp.server"
