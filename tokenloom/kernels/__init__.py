"""tokenloom's own CPU kernels (cpu_quant.cpp): quantized products, rotary attention, Llama blocks.

The C++ source is compiled on first use with the system's compiler (`c++`, or $CXX) into the
user cache, keyed by a hash of the source and flags, and called through ctypes: no PyTorch
headers, so a build takes ~2 s. Where the CPU has AVX-512 VNNI the build adds it (the products
then take two rows per instruction; the same numbers, bit for bit); TOKENLOOM_KERNELS=avx2
keeps the AVX2 build. Where there is no compiler, no AVX2, or TOKENLOOM_KERNELS=0, `library()`
is None and the quantized layers use PyTorch's own kernels instead (models/quant.py).
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
# AVX-512 VNNI (Intel since Cascade Lake, AMD since Zen 4); 256-bit auto-vectorization elsewhere,
# as in the AVX2 build
VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mprefer-vector-width=256"]
VNNI_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
ABI = 6
QK = 32  # weights per block, as in the C++ source


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "tokenloom" / "kernels"


def _usable_cpu() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def cpu_isa() -> str:
    """'avx512vnni' where the CPU has it (and TOKENLOOM_KERNELS is not 'avx2'), else 'avx2'."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx512vnni" if VNNI_CPU_FLAGS <= set(flags) and os.environ.get("TOKENLOOM_KERNELS") != "avx2" else "avx2"


def build(compiler: str | None = None, isa: str = "avx2") -> Path:
    """Compile the kernels for `isa` ('avx2' or 'avx512vnni') if not cached yet and return the
    shared library's path."""
    cxx = compiler or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = FLAGS + (VNNI_FLAGS if isa == "avx512vnni" else [])
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cxx, *flags]).encode()).hexdigest()[:16]
    out = cache_dir() / f"cpu_quant-{isa}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # built under a temporary name, then renamed: processes building at once never load half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        run = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
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
        return load(build(isa=cpu_isa()))
    except (OSError, RuntimeError) as e:
        log.warning("tokenloom's CPU kernels are unavailable, using PyTorch's: %s", e)
        return None


def load(path: Path) -> ctypes.CDLL:
    """A built library, its functions given their argument types."""
    lib = ctypes.CDLL(str(path))
    if lib.tl_abi_version() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.tl_abi_version()}, not {ABI}")
    p, i = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.tl_q4_gemm, lib.tl_q8_gemm):
        fn.argtypes = [p, i, i, p, p, i, p, ctypes.c_int]
        fn.restype = None
    lib.tl_q8_argmax.argtypes = [p, i, i, p, p, i, p, p, ctypes.c_int]
    lib.tl_q8_argmax.restype = None
    lib.tl_f32_gemm.argtypes = [p, i, i, p, p, i, p, ctypes.c_int]
    lib.tl_f32_gemm.restype = None
    lib.tl_rope_attention.argtypes = [p, i, i, i, i, p, p, p, p, i, p, p, i, p, i, ctypes.c_float, p, ctypes.c_int]
    lib.tl_rope_attention.restype = None
    f = ctypes.c_float
    lib.tl_llama_layers.argtypes = [p, i, i, p, i, f, i, i, i, i, p, p, i, p, p, i, p, f, ctypes.c_int]
    lib.tl_llama_layers.restype = None
    return lib


def _gemm(fn, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, n: int) -> torch.Tensor:
    x = x.contiguous()
    m, k = x.shape
    y = torch.empty(m, n)
    fn(x.data_ptr(), m, k, codes.data_ptr(), scales.data_ptr(), n, y.data_ptr(), torch.get_num_threads())
    return y


def q4_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 times Q4_1 weights (N, K) in the kernel's layout (models/quant.py q4_repack):
    codes (N / 8, K / 32, 128) uint8, scales (N / 8, K / 32, 16) float16 (8 scales, 8 mins) ->
    (M, N) float32. Rows are quantized to int8 per block of 32."""
    return _gemm(library().tl_q4_gemm, x, codes, scales, codes.shape[0] * 8)


def q8_mm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 times Q8_0 weights (N, K) in the kernel's layout (models/quant.py q8_repack):
    codes (N / 8, K / 32, 256) int8, scales (N / 8, K / 32, 8) float16 -> (M, N) float32."""
    return _gemm(library().tl_q8_gemm, x, codes, scales, codes.shape[0] * 8)


def f32_mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(M, K) float32 times w (N, K) float32 (+ bias (N,)) -> (M, N), as F.linear, but each row's
    numbers are the same at any row count M (MKL's are not)."""
    x, w = x.contiguous(), w.contiguous()
    bias = None if bias is None else bias.contiguous()
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n)
    library().tl_f32_gemm(x.data_ptr(), m, k, w.data_ptr(), None if bias is None else bias.data_ptr(), n,
                          y.data_ptr(), torch.get_num_threads())
    return y


def q8_argmax(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (M, K): the index of the largest product with Q8_0 weights (as q8_mm's, the
    first of equal ones) and that product, NaN where the row's products hold a NaN; (M,) int64
    and (M,) float32. The (M, N) products are never stored."""
    x = x.contiguous()
    m, k = x.shape
    idx, best = torch.empty(m, dtype=torch.long), torch.empty(m)
    library().tl_q8_argmax(x.data_ptr(), m, k, codes.data_ptr(), scales.data_ptr(), codes.shape[0] * 8,
                           idx.data_ptr(), best.data_ptr(), torch.get_num_threads())
    return idx, best


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, end: int, mask: torch.Tensor,
                   scale: float, n_heads: int) -> torch.Tensor:
    """Rotary grouped-query attention for B tokens, each at its own cache row and column (a
    decode step: a token per row; a prompt chunk: tokens of one row).

    qkv (B, (H + 2 * Hkv) * d) float32, the fused projection's output; cos, sin (B, d) (sin with
    rotate_half's sign folded in, see models/base.py Rotary); k_cache, v_cache (rows, Hkv, W, d),
    contiguous, into which token b's rotated key and value are written at row rows[b], column
    cols[b] (int64, (B,)); mask (B, end) bool. Returns (B, H * d)."""
    b, width = qkv.shape
    _, n_kv, w, d = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
    assert width == (n_heads + 2 * n_kv) * d and d % 8 == 0 and mask.shape == (b, end)
    assert rows.shape == cols.shape == (b,) and rows.dtype == cols.dtype == torch.long
    qkv, cos, sin, mask = qkv.contiguous(), cos.contiguous(), sin.contiguous(), mask.contiguous()
    out = torch.empty(b, n_heads * d)
    library().tl_rope_attention(qkv.data_ptr(), b, n_heads, n_kv, d, cos.data_ptr(), sin.data_ptr(),
                                k_cache.data_ptr(), v_cache.data_ptr(), w, rows.data_ptr(), cols.data_ptr(), end,
                                mask.data_ptr(), end, scale, out.data_ptr(), torch.get_num_threads())
    return out


def layer_table(blocks: list[tuple]) -> torch.Tensor:
    """The weight pointers of llama_layers for blocks given as their `weights` (see there): (L,
    16) int64, the last two columns (key and value caches) filled per call. The caller keeps the
    weights alive for as long as it uses the table."""
    table = torch.zeros(len(blocks), 16, dtype=torch.long)
    for i, (n1, n2, _, qkv, o, gu, _, dn, *_) in enumerate(blocks):
        ptrs = [n1.data_ptr(), n2.data_ptr()]
        for codes, scales, bias in (qkv, o, gu, dn):
            ptrs += [codes.data_ptr(), scales.data_ptr(), 0 if bias is None else bias.data_ptr()]
        table[i, :14] = torch.tensor(ptrs)
    return table


def llama_layers(blocks: list[tuple], table: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]],
                 x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                 end: int, mask: torch.Tensor) -> torch.Tensor:
    """Every Llama-style block of a model, with Q4_1 projections, in one call (tl_llama_layers),
    for B tokens at cache rows / columns `rows` / `cols` (as rope_attention), x (..., D) holding
    B = x.numel() // D. `blocks`: each block's (norm1, norm2, eps, qkv, o, gate_up, intermediate,
    down, heads, kv heads, head dim, scale), each projection as (codes, scales, bias or None) of
    a Q4Linear (models/llama.py); `table` from layer_table(blocks); `caches` each layer's (keys,
    values). x is not modified: the result is a new tensor."""
    _, _, eps, _, _, _, inter, _, h, hkv, d, scale = blocks[0]
    out = x.reshape(-1, x.shape[-1]).clone()
    b, dim = out.shape
    w = caches[0][0].shape[2]
    assert mask.shape == (b, end) and cos.shape == sin.shape == (b, d) and rows.shape == cols.shape == (b,)
    assert all(k.is_contiguous() and v.is_contiguous() and k.shape[2] == w for k, v in caches) and dim % 32 == 0
    table[:, 14] = torch.tensor([k.data_ptr() for k, _ in caches])
    table[:, 15] = torch.tensor([v.data_ptr() for _, v in caches])
    cos, sin, mask = cos.contiguous(), sin.contiguous(), mask.contiguous()
    library().tl_llama_layers(out.data_ptr(), b, len(blocks), table.data_ptr(), dim, eps, inter, h, hkv, d,
                              cos.data_ptr(), sin.data_ptr(), w, rows.data_ptr(), cols.data_ptr(), end,
                              mask.data_ptr(), scale, torch.get_num_threads())
    return out.view(x.shape)
