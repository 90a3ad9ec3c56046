"""Building blocks shared by the architectures: norms, rotary embeddings, masks, attention.

Model protocol (decoder-only): ``model(input_ids, position_ids, cache) -> logits``.
``position_ids`` is -1 at padding slots (batches are left-padded); the cache records the
position of every slot it holds, so each model derives its attention masks from positions
alone and needs no separate padding mask.
"""

from __future__ import annotations

import math
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom import kernels
from tokenloom.errors import CheckpointError, ModelLoadError


def args_from_config(cls, config: dict):
    """Build a dataclass from an HF config dict, ignoring keys the dataclass does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in known})


class RMSNorm(nn.Module):
    """RMS norm computed in float32. ``offset=1.0`` gives Gemma's ``x * (1 + w)``."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset and x.dtype == self.weight.dtype == torch.float32:
            # one call instead of six (it matters at decode); the same numbers in float32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


# ---------------------------------------------------------------------------- rotary


def rope_parameters(config: dict, layer_type: str | None = None) -> dict:
    """Rope settings as one dict, from either transformers v5 (`rope_parameters`) or v4 keys."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        return dict(params)
    # transformers v4 layout: rope_theta + rope_scaling (+ rope_local_base_freq for Gemma 3)
    out = dict(config.get("rope_scaling") or {})
    if layer_type == "sliding_attention" and "rope_local_base_freq" in config:
        return {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
    out.setdefault("rope_type", out.pop("type", "default"))
    out["rope_theta"] = config.get("rope_theta", 10000.0)
    return out


def rope_inv_freq(params: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention factor applied to cos/sin."""
    base = float(params.get("rope_theta", 10000.0))
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    kind = params.get("rope_type", "default")
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / float(params["factor"])
    elif kind == "llama3":
        # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, blend between.
        factor, lo, hi = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv = torch.where(medium, blended, scaled)
    else:
        raise ModelLoadError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")
    return inv.float(), 1.0


class Rotary:
    """cos/sin for arbitrary position ids; applied the HF way (rotate_half, non-interleaved).

    The sin table comes with rotate_half's sign folded in (-sin on the first half), so that
    `apply_rotary` needs one roll instead of two slices, a negation and a cat: 90 fewer ops
    per decode step of a 30-layer model, with the same bits (a sign moves between factors)."""

    def __init__(self, params: dict, head_dim: int):
        self.inv_freq, self.scale = rope_inv_freq(params, head_dim)

    def __call__(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids.clamp(min=0)[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
        sin = emb.sin() * self.scale
        sin[..., :sin.shape[-1] // 2].neg_()
        return (emb.cos() * self.scale).to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, where rotate_half(x) = (-x2, x1) = roll(x) * (-1, 1)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


# ---------------------------------------------------------------------------- masks & attention


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): True where query t may attend to key slot s.

    Keys at -1 are empty or padding. Padding queries (position -1) may attend to every slot:
    their outputs are discarded, and a fully masked row would give NaN in SDPA, which would
    then leak into the cache through 0 * NaN.
    """
    q = q_pos[:, :, None]  # (B, T, 1)
    k = k_pos[:, None, :]  # (B, 1, S)
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= (q - k) < window
    allowed |= q < 0
    return allowed[:, None]


def attend(q, k, v, mask, scale: float | None) -> torch.Tensor:
    """q (B, H, T, hd), k/v (B, Hkv, S, hd) -> (B, T, H*hd). Grouped-query heads are expanded by SDPA."""
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype == torch.float32 \
            and (mask is None or mask.dtype == torch.bool):
        return _attend_one(q, k, v, mask, scale)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    b, h, t, d = out.shape
    return out.transpose(1, 2).reshape(b, t, h * d)


def fused_decode_ok(x: torch.Tensor, mask: torch.Tensor | None, cache, head_dim: int) -> bool:
    """Whether a step may run the fused kernels (kernels.rope_attention, kernels.llama_layers):
    our kernels built, float32 on the CPU, a boolean mask, and a cache that can say where each
    token goes (`slot_write`)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and mask is not None
            and mask.dtype == torch.bool and head_dim % 8 == 0 and hasattr(cache, "slot_write")
            and kernels.library() is not None)


def _attend_one(q, k, v, mask, scale: float | None) -> torch.Tensor:
    """One query per row (a decode step), as plain batched matmuls.

    On CPU with 2+ threads, SDPA's flash kernel gives a row different low bits depending on
    the rows beside it (it splits work by batch size), so a request's tokens would depend on
    what else is being decoded. Each product here is one small matmul per (row, kv head),
    whatever the batch, so a row's result is its own. Costs ~10-60 us per layer more than SDPA.
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    # the g query heads sharing a kv head become g query rows against it: no k/v expansion
    scores = torch.matmul(q.reshape(b, hkv, h // hkv, d), k.transpose(-1, -2))
    scores.mul_(d ** -0.5 if scale is None else scale)
    if mask is not None:
        scores.masked_fill_(mask.logical_not(), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).reshape(b, 1, h * d)


# ---------------------------------------------------------------------------- weights


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Strictly assign `weights` to a (meta-initialised) model, reporting every problem at once."""
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    bad_shape = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in weights and weights[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_abbrev(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatch: {_abbrev(bad_shape)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    model.load_state_dict(weights, strict=True, assign=True)


def _abbrev(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def fuse(weights: dict, names: list[str], into: str) -> None:
    """Concatenate several projection weights (along the output dim) into one, in place."""
    if all(n in weights for n in names):
        weights[into] = torch.cat([weights.pop(n) for n in names], dim=0)


DENSE_MIN = 64  # more than one position per row and this many in all: a prefill (see is_prefill)


def is_prefill(x: torch.Tensor) -> bool:
    """Many positions per row: decided by the sequence axis, so a decode step (one position per
    row) takes the same kernel at every batch size."""
    return x.dim() > 2 and x.shape[-2] > 1 and x.numel() // x.shape[-1] >= DENSE_MIN


def rows_independent(dtype: torch.dtype, device) -> bool:
    """Whether float products here run in `linear`'s own kernel, whose rows' numbers do not
    depend on the row count (the engine then pads no rows, engine/slots.py)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and kernels.library() is not None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but on CPU in float32 anything short of a prefill runs in kernels.f32_mm, whose
    rows' numbers do not depend on the row count: a request decodes to the same bits alone or
    among others (engine/slots.py). MKL's sgemm changes kernels with the row count at a threshold
    that depends on the shape (3 to 57 rows measured on AVX-512). The price, measured with
    benchmarks/bench_kernels.py (30 layers of SmolLM2-135M, weights from memory; three runs on
    AVX-512, ms, MKL against ours): 1 row 22-27 against 24-30, 4 rows 42-47 against 35-37, 8 rows
    49-58 against 39-43, 32 rows 70-76 against 63-99; the head at 32 rows 12.5-16.9 against 17-20."""
    if (rows_independent(x.dtype, x.device) and w.dtype == torch.float32 and not is_prefill(x)
            and not torch.is_grad_enabled()):
        return kernels.f32_mm(x.reshape(-1, x.shape[-1]), w, b).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """nn.Linear through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class OutputHead(Linear):
    """The vocabulary projection (the largest matmul of a decode step).

    Decode steps (and a prompt's last position) take `linear`. A prefill's full logits on CPU in
    float32 run in oneDNN: MKL's sgemm is slow for this wide shape, so the weight is also kept in
    oneDNN's layout, made on first use and rebuilt if the weight changes. (At 1 / 8 / 32 rows,
    oneDNN 3.3 / 9.2 / 15.7 ms, ours 2.8 / 7.7 / 13.8 ms, one A/B run here.)
    """

    _packed: torch.Tensor | None = None
    _packed_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not (is_prefill(x) and w.device.type == "cpu" and w.dtype == torch.float32 and x.dtype == torch.float32
                and torch.backends.mkldnn.is_available() and not torch.is_grad_enabled()):
            return super().forward(x)
        key = (w.data_ptr(), w._version)
        if self._packed_key != key:
            self._packed, self._packed_key = w.detach().to_mkldnn(), key
        shape = x.shape
        out = torch._C._nn.mkldnn_linear(x.reshape(-1, shape[-1]).contiguous().to_mkldnn(), self._packed, None)
        out = out.to_dense().view(*shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def fused_halves(proj: nn.Module, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves (rows [0, n) and [n, 2n)) of a fused projection such as gate/up.

    A float layer runs two products on row slices of its weight: contiguous outputs make the
    element-wise ops that follow about 25% faster in prefill than splitting one wide output.
    A quantized layer (models/quant.py) keeps its packed weight whole and is split after.
    """
    if not isinstance(proj, nn.Linear):
        out = proj(x)
        return out[..., :n], out[..., n:]
    w, b = proj.weight, proj.bias
    return linear(x, w[:n], None if b is None else b[:n]), linear(x, w[n:], None if b is None else b[n:])


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding without its random init: models are built on the meta device and then get
    their weights, and initialising a meta embedding imports torch._dynamo (~2 s per load)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))
