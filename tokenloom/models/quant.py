"""Weight-only quantized linear layers for CPU: int4 (groups of 32 along the input) and int8.

A decode step (one new token per row) is bound by the bytes of weights it reads, so it runs in
kernels that read the packed weights directly. Two sets:
- tokenloom's own (kernels/cpu_quant.cpp; x86 with AVX2): `Q4Linear` (Q4_1 blocks) and
  `Q8Linear` (Q8_0 blocks), with each row of activations quantized to int8 per block, as
  llama.cpp does. 1.8-3.3x faster than PyTorch's here at 1 to 32 rows, and for a 512-token
  prefill faster than float32 GEMM (benchmarks/bench_kernels.py), so they run every input.
- PyTorch's, where ours do not build: `Int4Linear` (`_weight_int4pack_mm_for_cpu`) and
  `Int8Linear` (`_weight_int8pack_mm`, per output channel), fast only with bfloat16
  activations, so rows go in and out as bfloat16 around the product. For a prefill (many
  tokens per row, bound by arithmetic) float32 GEMM is several times faster than those on a CPU
  without native bfloat16: there each layer's weights are expanded to float32 just for that
  product, and dropped after it, so memory stays at the packed size. Whether an input is a
  prefill is read from its shape (more than one position per row, DENSE_MIN positions in all),
  never from the batch size: a row's numbers do not depend on its neighbours.

`quantize_model` swaps the float `nn.Linear` layers of a loaded model for these. The output head
(and an embedding tied to it) gets int8, not int4: on the default model an int4 head cost +6.7%
perplexity and saved almost no time.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom import kernels
from tokenloom.heap import trim_heap
from tokenloom.models.base import is_prefill

GROUP = 32  # int4 group size along the input: that of Q4_0 / Q4_1 / the Q4_K sub-blocks
MODES = ("int4", "int8", "w8a8")
A_MAX = 63  # w8a8: activations are scaled per row to [-A_MAX, A_MAX] (7 bits, see W8A8Linear)


def int4_groups(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization of (N, K) weights in groups of `group` along K.

    Returns codes (N, K) int32 in [0, 15], and scales and mins (N, K // group) float32 with
    w ~= code * scale + min, Q4_1's convention. Weights that came from a Q4_1 file (whose
    blocks hold codes 0 and 15) get the file's grid back.
    """
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    codes = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.int32).reshape(n, k)
    return codes, scale, lo


def int8_rows(w: torch.Tensor, rows: int = 4096, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (N, K) -> codes (N, K) int8 in [-qmax, qmax], scales (N,) float32.

    Done `rows` at a time: a vocabulary-sized table would otherwise need two float32 copies."""
    codes = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    for i in range(0, w.shape[0], rows):
        wf = w[i:i + rows].float()
        s = (wf.abs().amax(-1) / qmax).clamp(min=1e-12)
        codes[i:i + rows] = (wf / s[:, None]).round_().clamp_(-qmax, qmax)
        scale[i:i + rows] = s
    return codes, scale


@functools.cache
def int4_block() -> int | None:
    """Rows per block of the int4 kernel's packed layout on this CPU, or None if unknown.

    The packer (dispatched per CPU capability) stores blocks of B rows as (K, B / 2) bytes: the
    low nibbles hold rows [0, B/2) of the block, the high ones rows [B/2, B). B is 32 with AVX2
    and 64 with AVX-512; it is found by packing known codes and checked on random ones.
    """
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block in (32, 64, 16, 128):
        p = packed.view(128 // block, 64, block // 2)
        if torch.equal(torch.cat([p & 15, p >> 4], 2).transpose(1, 2).reshape(128, 64).int(), codes):
            return block
    return None


def int4_supported(out_features: int, in_features: int) -> bool:
    block = int4_block()
    return block is not None and in_features % GROUP == 0 and out_features % block == 0


class _PackedLinear(nn.Module):
    """What the int4 and int8 layers share: the choice of kernel by input shape, and the bias."""

    out_features: int
    in_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if is_prefill(x):  # float32 GEMM on weights expanded for this product
            out = torch.mm(x2, self.dense_t())
        else:
            out = self.packed_mm(x2)
        out = out.view(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        """(M, in) float32 -> (M, out) float32, straight from the packed weights."""
        raise NotImplementedError

    def dense_t(self) -> torch.Tensor:
        """The weights as float32, transposed: (in, out)."""
        raise NotImplementedError


class Int4Linear(_PackedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, scale, lo = int4_groups(weight)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # (K // group, N, 2): the kernel's layout for scales and zeros, w = (code - 8) * scale + zero
        self.register_buffer("scales_zeros", torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().bfloat16())
        self.register_buffer("bias", None if bias is None else bias.float())

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, GROUP, self.scales_zeros).float()

    def dense_t(self) -> torch.Tensor:
        """Read straight from the packed layout (see `int4_block`), written in (in, out) order."""
        n, k, b = self.out_features, self.in_features, int4_block()
        q = self.packed.view(n // b, k, b // 2).permute(1, 0, 2).reshape(k // GROUP, GROUP, n // b, b // 2)
        sz = self.scales_zeros.float()  # (K // group, N, 2)
        scale = sz[..., 0].view(k // GROUP, 1, n // b, 2, b // 2)
        zero = (sz[..., 1] - 8 * sz[..., 0]).view(k // GROUP, 1, n // b, 2, b // 2)
        out = torch.empty(k // GROUP, GROUP, n // b, 2, b // 2)
        # codes cast to float first, then scaled in place: a uint8 x float32 product (type
        # promotion + broadcasting) took twice as long for the same bits (~280 vs ~130 ms a model)
        out[..., 0, :].copy_(q & 15)
        out[..., 1, :].copy_(q >> 4)
        return out.mul_(scale).add_(zero).view(k, n)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {GROUP}"


class Int8Linear(_PackedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, scale = int8_rows(weight)
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scales", scale.bfloat16())
        self.register_buffer("bias", None if bias is None else bias.float())

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.bfloat16(), self.weight_int8, self.scales).float()

    def dense_t(self) -> torch.Tensor:
        return self.weight_int8.float().mul_(self.scales.float()[:, None]).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def q4_repack(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_1 blocks -> the layout of our kernel (cpu_quant.cpp, q4_group): codes (N, K) in [0, 15]
    and scales, mins (N, K // 32) -> codes (N // 8, K // 32, 128) uint8, where byte 4r + t of
    chunk i holds channel r's codes for inputs 8i + t (low nibble) and 8i + 4 + t (high), and
    (N // 8, K // 32, 16) float16: the group's 8 scales, then its 8 mins."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // 8, 8, k // GROUP, 4, 2, 4).permute(0, 2, 3, 4, 1, 5)  # g b i h r t
    packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(n // 8, k // GROUP, 128)
    sm = torch.stack([scale, lo], -1).half().view(n // 8, 8, k // GROUP, 2).permute(0, 2, 3, 1)
    return packed, sm.reshape(n // 8, k // GROUP, 16)


def q4_unpack(packed: torch.Tensor, sm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4_repack's inverse: codes (N, K) uint8, scales and mins (N, K // 32) float16."""
    g, nb = packed.shape[:2]
    p = packed.view(g, nb, 4, 1, 8, 4)
    c = torch.cat([p & 15, p >> 4], 3).permute(0, 4, 1, 2, 3, 5).reshape(g * 8, nb * GROUP)
    s = sm.view(g, nb, 2, 8).permute(0, 3, 1, 2).reshape(g * 8, nb, 2)
    return c, s[..., 0], s[..., 1]


class _BlockLinear(nn.Module):
    """What Q4Linear and Q8Linear share: one kernel for every input shape (our kernels beat or
    match float32 GEMM even for a prefill, and expanding weights would cost memory)."""

    out_features: int
    in_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.kernel(x.reshape(-1, x.shape[-1]), self.codes, self.scales)
        out = out.view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Q4Linear(_BlockLinear):
    """int4 in Q4_1 blocks (per 32 inputs: fp16 scale and min, 4-bit codes), run by tokenloom's
    own kernel (kernels/cpu_quant.cpp), which quantizes each row of activations to int8 per
    block and sums products in integers, as llama.cpp does. The codes are repacked by groups of
    8 output channels (q4_repack) so that one instruction multiplies 4 inputs of 8 channels.
    On AVX2 that is 1.5-3x faster than `_weight_int4pack_mm_for_cpu` at every row count and,
    from ~32 rows, faster than float32 GEMM (benchmarks/bench_kernels.py), so a prefill runs on
    it too instead of on expanded weights. Activations keep 8 bits per block where that kernel's
    bfloat16 keeps 8 per value (measured error against float32: 0.5% vs 1.9%). Built only where
    the kernels are, for output sizes that are multiples of 8."""

    kernel = staticmethod(kernels.q4_mm)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, scales = q4_repack(*int4_groups(weight))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)  # (scale, min) pairs
        self.register_buffer("bias", None if bias is None else bias.float())

    def dense_t(self) -> torch.Tensor:
        """The weights as float32, transposed: (in, out) (for tests and tools, not the hot path)."""
        codes, scale, lo = q4_unpack(self.codes, self.scales)
        n, k = codes.shape
        w = codes.float().view(n, k // GROUP, GROUP) * scale.float()[..., None] + lo.float()[..., None]
        return w.view(n, k).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q4_1 blocks of {GROUP}"


def int8_blocks(w: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per block of 32 along the input (Q8_0): (N, K) -> codes (N, K) int8,
    scales (N, K // 32) float16, `rows` at a time."""
    n, k = w.shape
    codes = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(n, k // GROUP, dtype=torch.float16)
    for i in range(0, n, rows):
        g = w[i:i + rows].float().view(-1, k // GROUP, GROUP)
        s = (g.abs().amax(-1) / 127).half().clamp_(min=2 ** -24)  # codes made with the fp16 scale
        codes[i:i + rows] = (g / s.float()[..., None]).round_().clamp_(-127, 127).view(-1, k)
        scale[i:i + rows] = s
    return codes, scale


def q8_repack(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks -> the layout of our kernel (cpu_quant.cpp, q8_group): codes (N, K) int8 and
    scales (N, K // 32) -> codes (N // 8, K // 32, 256), where byte 4r + t of chunk c holds
    channel r's code for input 4c + t, and scales (N // 8, K // 32, 8) float16."""
    n, k = codes.shape
    c = codes.view(n // 8, 8, k // GROUP, 8, 4).permute(0, 2, 3, 1, 4)  # g b c r t
    return c.reshape(n // 8, k // GROUP, 256), scales.half().view(n // 8, 8, k // GROUP).transpose(1, 2).contiguous()


def q8_rows(codes: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Some rows (channels) of q8_repack's layout, as plain Q8_0: codes (*, K) int8, scales (*, K // 32)."""
    g, nb = codes.shape[:2]
    r = rows.reshape(-1)
    c = codes.view(g, nb, 8, 8, 4)[r // 8, :, :, r % 8]  # (n, nb, 8, 4)
    return c.reshape(*rows.shape, nb * GROUP), scales[r // 8, :, r % 8].view(*rows.shape, nb)


class Q8Linear(_BlockLinear):
    """int8 in Q8_0 blocks (per 32 inputs: an fp16 scale), times int8 activations in tokenloom's
    own kernel, repacked by groups of 8 channels as Q4Linear: the output head of an int4 model,
    ~2x faster than `_weight_int8pack_mm` here at one row, ~4x at 32 (benchmarks/bench_kernels.py)."""

    kernel = staticmethod(kernels.q8_mm)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, scales = q8_repack(*int8_blocks(weight))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.float())

    def argmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of x (R, in): the index of the largest output (the first of equal ones) and
        that output, NaN if the row's outputs hold one. Without a bias, the kernel never makes
        the (R, out) outputs: for a greedy step's head, 6.3 MB at 32 rows (engine.py)."""
        if self.bias is not None:
            out = self(x)
            return out.argmax(-1), out.amax(-1)
        return kernels.q8_argmax(x, self.codes, self.scales)

    def dense_t(self) -> torch.Tensor:
        """The weights as float32, transposed: (in, out) (for tests and tools, not the hot path)."""
        codes, scales = q8_rows(self.codes, self.scales, torch.arange(self.out_features))
        n, k = codes.shape
        return (codes.float().view(n, k // GROUP, GROUP) * scales.float()[..., None]).view(n, k).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 blocks of {GROUP}"


class Q8Embedding(nn.Module):
    """The token table of a Q8Linear head it is tied to: the same codes and scales."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings = codes.shape[0] * 8
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes, scales = q8_rows(self.codes, self.scales, ids)
        k = codes.shape[-1]
        rows = codes.float().view(*ids.shape, k // GROUP, GROUP)
        return rows.mul_(scales.float()[..., None]).view(*ids.shape, k)


def w8a8_supported() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class W8A8Linear(nn.Module):
    """int8 weights times int8 activations, int32 sums: FBGEMM's integer GEMM (x86, AVX2 or later).

    Its cost grows more slowly with the number of rows than the int4 kernel's, which is
    compute-bound on AVX2: all 120 SmolLM2 layer products took 116 ms at 32 rows against int4's
    137, but 36 ms at one row against 13 (~15 small ops a layer quantize the rows). FBGEMM also
    keeps the original codes beside its packed copy: twice int8's memory.

    Activations are quantized per row, never per tensor, so a row's numbers do not depend on its
    neighbours: each row is scaled to [-63, 63] by its own absolute maximum and sent as two
    rows, its rounding and its rounding error times 126, which together carry ~13 bits (one
    8-bit row alone cost +1.5% perplexity on the default model). Integer sums are exact, so the
    result does not depend on how the kernel blocks the rows either. Activations get 7 bits per row, not 8, so that the weights can keep 8
    (per output channel, as the int8 layers): the kernel adds pairs of uint8 x int8 products in
    int16, which 8 x 8 bits could overflow.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, scale = int8_rows(weight)
        with warnings.catch_warnings():  # quantized tensors are deprecated, their kernels are not gone
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(
                codes, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        del codes
        with _quantized_engine("fbgemm"):
            self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        m = x2.shape[0]
        amax = x2.abs().amax(-1, keepdim=True).clamp_(min=1e-30)
        u = x2 * (A_MAX / amax)
        q = u.round()
        rows = torch.cat([q, (u - q).mul_(2 * A_MAX)])  # |u - q| <= 1/2: the error fills the range too
        # codes q + 64 in [1, 127]: "quantized" with scale 1 and zero point 64, exactly
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows, 1.0, A_MAX + 1, self._packed)
        out = torch.add(y[:m], y[m:], alpha=1 / (2 * A_MAX)).mul_(amax / A_MAX)
        out = out.view(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def dense_t(self) -> torch.Tensor:
        """The weights as float32, transposed: (in, out) (for tests and tools, not the hot path)."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize().t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 (FBGEMM)"


@contextlib.contextmanager
def _quantized_engine(name: str):
    old = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = old


class Int8Embedding(nn.Module):
    """An embedding table of int8 rows; shares the codes of an Int8Linear head it is tied to."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings = codes.shape[0]
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scales", scales.bfloat16())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_int8).float() * self.scales.float()[ids, None]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _kind(mode: str, m: nn.Linear, head: nn.Module | None) -> type[nn.Module]:
    """Our kernels where they build (kernels.library()), else PyTorch's."""
    if mode == "w8a8":
        return W8A8Linear
    own = kernels.library() is not None and m.in_features % GROUP == 0
    if mode == "int4" and m is not head:
        if own and m.out_features % 8 == 0:
            return Q4Linear
        if int4_supported(m.out_features, m.in_features):
            return Int4Linear
    return Q8Linear if own and m.out_features % 8 == 0 else Int8Linear


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Swap every nn.Linear of a float32 CPU model (in place) for an int4, int8 or w8a8 one.

    int4: the head gets int8, as does any layer the int4 layout cannot take (an input size that
    is not a multiple of 32, say). Our kernels' layers where they build, else PyTorch's.
    w8a8: every layer, the head too, multiplies int8 by int8.
    Embedding tables become int8 rows; one tied to a weight-only int8 head shares its codes.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r} (allowed: {', '.join(MODES)})")
    if mode == "w8a8" and not w8a8_supported():
        raise ValueError("quantization 'w8a8' needs PyTorch's FBGEMM kernels (an x86 CPU with AVX2)")
    head = getattr(model, "lm_head", None)
    # only plain tables: subclasses (BART's learned positions) read their weight themselves
    embeds = [name for name, m in model.named_modules() if type(m) is nn.Embedding]
    tied = [name for name in embeds
            if head is not None and model.get_submodule(name).weight.data_ptr() == head.weight.data_ptr()]
    with torch.no_grad():
        for name in embeds:
            if name not in tied or mode == "w8a8":
                _replace(model, name, Int8Embedding(*int8_rows(model.get_submodule(name).weight)))
        # by name, holding no module between iterations: each float weight is freed once packed
        for name in [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
            m = model.get_submodule(name)
            new = _kind(mode, m, head)(m.weight, m.bias)
            _replace(model, name, new)
            if m is head and isinstance(new, (Int8Linear, Q8Linear)):
                table = Q8Embedding(new.codes, new.scales) if isinstance(new, Q8Linear) else \
                    Int8Embedding(new.weight_int8, new.scales)
                for ename in tied:
                    _replace(model, ename, table)
    # every product now gives a row the same numbers at any row count (tests/test_quant.py),
    # so the engine need not pad decode steps to a multiple of 4 rows (engine/slots.py)
    model.row_multiple = 1
    trim_heap()
    return model
