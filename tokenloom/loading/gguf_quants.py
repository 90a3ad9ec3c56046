"""Dequantization of ggml tensor types to floating point, vectorized in torch.

Every quantized ggml type packs `block_size` weights into `type_size` bytes: a few
fp16 scales and packed integer codes. Each decoder below takes a (n_blocks, type_size)
uint8 tensor and writes the (n_blocks, block_size) float32 weights into a given output;
no Python loop runs over blocks (only over chunks of ~4M weights, to bound memory).
The byte layouts are those of ggml-common.h (`block_q4_0`, `block_q4_K`, ...). The
arithmetic is done in float32 in the same order as the numpy reference in
`gguf.quants`, so results are bit-identical to it (tests check this).

Reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md and
ggml/src/ggml-quants.c (`dequantize_row_*`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenloom.loading.gguf_constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

QK_K = 256  # weights per super-block of the k-quants
# Blocks are dequantized this many weights at a time: bounds the float32
# temporaries (a few x 16 MiB) however large the tensor is.
_CHUNK_WEIGHTS = 1 << 22

_SHIFT_4 = torch.tensor([0, 4], dtype=torch.uint8)
_SHIFT_2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_SHIFT_1 = torch.arange(8, dtype=torch.uint8)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte `at` (even) of every block -> (n, 1) float32.

    Every block size is even, so the blocks reinterpret as int16 columns without a copy.
    """
    return b.view(torch.int16)[:, at // 2:at // 2 + 1].view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k) codes: all low nibbles first, then all high nibbles."""
    n, k = qs.shape
    out = torch.empty(n, 2, k, dtype=torch.uint8)
    torch.bitwise_and(qs, 0x0F, out=out[:, 0])
    torch.bitwise_right_shift(qs, 4, out=out[:, 1])
    return out.view(n, 2 * k)


def _affine(out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None,
            subtract: bool = False) -> None:
    """out = q * scale (+ or - offset), rounding after each step like the numpy reference.

    Integer codes are offset in int8 (exact) by the callers; copying them into `out`
    converts them to float32, which is cheaper than a mixed-dtype multiplication.
    """
    out.copy_(q)
    out.mul_(scale)
    if offset is not None:
        out.sub_(offset) if subtract else out.add_(offset)


def _bits(qh: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 8k) bits; bit j of byte i lands at 8i + j (a little-endian bitfield)."""
    return ((qh.unsqueeze(-1) >> _SHIFT_1) & 1).reshape(qh.shape[0], -1)


# Each decoder writes the (n, block_size) float32 weights of the (n, type_size) blocks `b`
# into `out`.


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    _affine(out, _nibbles(b[:, 2:]).view(torch.int8) - 8, _f16(b, 0))


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    _affine(out, _nibbles(b[:, 4:]), _f16(b, 0), _f16(b, 2))


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)  # the 5th bits sit in one uint32
    _affine(out, q.view(torch.int8) - 16, _f16(b, 0))


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)
    _affine(out, q, _f16(b, 0), _f16(b, 2))


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    _affine(out, b[:, 2:].view(torch.int8), _f16(b, 0))


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # scales[16] (4-bit scale | 4-bit min per 16 weights), qs[64] (2-bit codes), d, dmin
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F)).view(n, 16, 1)
    ml = (dmin * (scales >> 4)).view(n, 16, 1)
    # each 32-byte half holds 4 planes of 2-bit codes, one 32-weight run per plane
    q = ((qs.view(n, 2, 1, 32) >> _SHIFT_2.view(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    _affine(out.view(n, 16, 16), q, dl, ml, subtract=True)


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # hmask[32] (high bit, inverted), qs[64] (low 2 bits), scales[12] (16 x 6-bit), d
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    low = ((packed[:, :8].view(n, 1, 8) >> _SHIFT_4.view(1, 2, 1)) & 0x0F).reshape(n, 16)
    high = ((packed[:, 8:12].view(n, 1, 4) >> _SHIFT_2.view(1, 4, 1)) & 3).reshape(n, 16)
    scales = (low | (high << 4)).view(torch.int8) - 32
    dl = (_f16(b, 108) * scales).view(n, 16, 1)
    ql = ((qs.view(n, 2, 1, 32) >> _SHIFT_2.view(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
    qh = ((hmask.view(n, 1, 1, 32) >> _SHIFT_1.view(1, 1, 8, 1)) & 1).reshape(n, 16, 16)
    # a set mask bit means "no offset": code = low - 4 * (1 - bit)
    q = ql.view(torch.int8) - ((qh ^ 1) << 2).view(torch.int8)
    _affine(out.view(n, 16, 16), q, dl)


def _k_scale_min(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte block of eight 6-bit scales and eight 6-bit mins of Q4_K / Q5_K."""
    n = packed.shape[0]
    p = packed.reshape(n, 3, 4)
    lo_d, lo_m, hi = p[:, 0], p[:, 1], p[:, 2]
    # sub-blocks 0-3 keep 6 bits in bytes 0-7; 4-7 get 4 bits from bytes 8-11 plus the
    # 2 spare top bits of bytes 0-7
    sc = torch.cat([lo_d & 0x3F, (hi & 0x0F) | ((lo_d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # d, dmin, scales[12], qs[128]: 8 sub-blocks of 32 weights, a scale and a min each
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    scale, offset = (_f16(b, 0) * sc).view(n, 8, 1), (_f16(b, 2) * mn).view(n, 8, 1)
    q = ((b[:, 16:].reshape(n, 4, 1, 32) >> _SHIFT_4.view(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    _affine(out.view(n, 8, 32), q, scale, offset, subtract=True)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # d, dmin, scales[12], qh[32] (5th bits), qs[128]
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    ql = ((b[:, 48:].reshape(n, 4, 1, 32) >> _SHIFT_4.view(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    qh = ((b[:, 16:48].reshape(n, 1, 1, 32) >> _SHIFT_1.view(1, 1, 8, 1)) & 1).reshape(n, 8, 32)
    scale, offset = (_f16(b, 0) * sc).view(n, 8, 1), (_f16(b, 2) * mn).view(n, 8, 1)
    _affine(out.view(n, 8, 32), ql | (qh << 4), scale, offset, subtract=True)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    # ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d
    n = b.shape[0]
    dl = (_f16(b, 208) * b[:, 192:208].view(torch.int8)).view(n, 16, 1)
    ql = ((b[:, :128].reshape(n, 2, 1, 64) >> _SHIFT_4.view(1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> _SHIFT_2.view(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
    q = (ql | (qh << 4)).view(torch.int8) - 32
    _affine(out.view(n, 16, 16), q.reshape(n, 16, 16), dl)


def _floats(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], None]:
    return lambda b, out: out.copy_(b.contiguous().view(dtype))


_DEQUANTIZERS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    T.F32: _floats(torch.float32),
    T.F16: _floats(torch.float16),
    T.BF16: _floats(torch.bfloat16),
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in _DEQUANTIZERS)


def type_name(ggml_type: int) -> str:
    try:
        return T(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def supported_type_names() -> str:
    return ", ".join(type_name(t) for t in sorted(SUPPORTED_TYPES))


def dequantize(raw: torch.Tensor, ggml_type: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode the uint8 tensor `raw` (whole blocks of `ggml_type`) into a flat tensor of `dtype`.

    Raises KeyError for a type without a dequantizer (callers check `SUPPORTED_TYPES`)
    and ValueError when `raw` is not a whole number of blocks.
    """
    fn = _DEQUANTIZERS[ggml_type]
    block_size, type_size = GGML_QUANT_SIZES[T(ggml_type)]
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() % type_size:
        raise ValueError(f"{type_name(ggml_type)} data must be a flat uint8 tensor of whole {type_size}-byte blocks")
    n_blocks = raw.numel() // type_size
    blocks = raw.view(n_blocks, type_size)
    out = torch.empty(n_blocks, block_size, dtype=dtype)
    step = max(1, _CHUNK_WEIGHTS // block_size)
    # float32 is decoded in place; other dtypes go through one reusable float32 chunk
    scratch = None if dtype == torch.float32 else torch.empty(min(step, n_blocks), block_size)
    for start in range(0, n_blocks, step):
        chunk = blocks[start:start + step]
        if scratch is None:
            fn(chunk, out[start:start + step])
        else:
            fn(chunk, scratch[:len(chunk)])
            out[start:start + step] = scratch[:len(chunk)]
    return out.view(-1)
