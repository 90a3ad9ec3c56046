"""tokenloom's own CPU kernels (cpu_quant.cpp): quantized products for decode steps.

The C++ source is compiled on first use with the system's compiler (`c++`, or $CXX) into the
user cache, keyed by a hash of the source and flags, and called through ctypes: no PyTorch
headers, so a build takes ~2 s. Where there is no compiler, no AVX2, or TOKENLOOM_KERNELS=0,
`library()` is None and the quantized layers use PyTorch's own kernels instead (models/quant.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_quant.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]
ABI = 1
QK = 32  # weights per block, as in the C++ source


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tokenloom" / "kernels"


def _usable_cpu() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def build(compiler: str | None = None) -> Path:
    """Compile the kernels (if not cached yet) and return the shared library's path."""
    cxx = compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cxx, *FLAGS]).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_quant-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name, then renamed: processes building at once never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        run = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{run.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot run here (see the module docstring)."""
    if os.environ.get("TOKENLOOM_KERNELS", "1") == "0" or not _usable_cpu():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as e:
        log.warning("tokenloom's CPU kernels are unavailable, using PyTorch's: %s", e)
        return None
    if lib.tl_abi_version() != ABI:
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.tl_q4_gemm, lib.tl_q8_gemm):
        fn.argtypes = [p, i, i, p, p, i, p, ctypes.c_int]
        fn.restype = None
    return lib


def _gemm(fn, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, n)
    fn(x.data_ptr(), m, k, codes.data_ptr(), scales.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    return y


def q4_mm(x: torch.Tensor, codes: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 times Q4_1 weights (N, K): codes (N, K / 2) uint8, scale_min (N, K / 32, 2)
    float16 (a weight is scale * code + min) -> (M, N) float32. Rows are quantized to int8."""
    return _gemm(library().tl_q4_gemm, x, codes, scale_min, codes.shape[0])


def q8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 times Q8_0 weights (N, K): codes (N, K) int8, scales (N, K / 32) float16."""
    return _gemm(library().tl_q8_gemm, x, codes, scales, codes.shape[0])
