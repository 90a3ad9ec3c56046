"""T5 encoder-decoder (T5 v1.0, T5 v1.1 / flan-T5, mT5).

Pre-norm transformer with T5's RMS-style layer norm (no mean, no bias), no attention scaling
(folded into the weights at training time) and learned relative position buckets: layer 0 of
each stack owns the bias table and every layer of that stack reuses the bias. The encoder's
buckets are bidirectional, the decoder's unidirectional; cross-attention has no position bias.
v1.0 uses a ReLU FFN and a tied head with the decoder output rescaled by ``d_model ** -0.5``;
v1.1 / flan-T5 / mT5 use a gated-GELU FFN (tanh approximation) and an untied head.
Q/K/V (and the cross-attention K/V, and the gated FFN's two inputs) are fused at load time.

Encoder-decoder protocol: ``encode(ids, mask) -> memory``; ``make_cache(..., memory, memory_mask)``
projects the memory once per decoder layer into ``cache.cross_k/v``; ``forward(ids, positions,
cache)`` runs decoder steps. Reference: Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer"; HF `modeling_t5.py` is the numerical oracle.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.errors import ModelLoadError
from tokenloom.models.base import Linear, OutputHead, args_from_config, attend, attention_mask, fuse, fused_halves, embedding
from tokenloom.models.cache import KVCache


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    # transformers' NewGELUActivation, written out so the float32 rounding matches it exactly
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class ModelArgs:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    pad_token_id: int = 0
    decoder_start_token_id: int | None = None
    # Nominal length: relative positions extrapolate, but T5 was trained on <= 512 tokens, and
    # the engine caps the decoder's output at this (it never allocates this many slots itself).
    n_positions: int = 512
    model_type: str = "t5"
    scale_decoder_outputs: bool | None = None  # rescale before the head by d_model ** -0.5 (v1.0)
    tie_word_embeddings: bool | None = None
    gated: bool = False
    act: str = "relu"

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        args = args_from_config(cls, config)
        args.num_decoder_layers = args.num_decoder_layers or args.num_layers
        if args.decoder_start_token_id is None:
            args.decoder_start_token_id = args.pad_token_id
        parts = args.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ModelLoadError(f"invalid feed_forward_proj {args.feed_forward_proj!r} (expected 'ACT' or 'gated-ACT')")
        args.gated, args.act = len(parts) == 2, parts[-1]
        if args.feed_forward_proj == "gated-gelu":
            args.act = "gelu_new"  # as transformers: "gated-gelu" means the tanh approximation
        if args.act not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported T5 activation {args.act!r} (supported: {', '.join(ACTIVATIONS)})")
        if args.scale_decoder_outputs is None:
            # transformers 5 saves `scale_decoder_outputs`; older configs say it with
            # `tie_word_embeddings` (absent = True for T5). transformers 5 never rescales mT5.
            args.scale_decoder_outputs = args.model_type != "mt5" and args.tie_word_embeddings is not False
        return args


class LayerNorm(nn.Module):
    """T5's norm: x / rms(x) * w, variance in float32, no mean and no bias (as T5LayerNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(self.weight.dtype)


class RelativeBias(nn.Module):
    """Learned bias per (bucket of key position - query position, head)."""

    def __init__(self, args: ModelArgs, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = args.relative_attention_num_buckets, args.relative_attention_max_distance
        self.relative_attention_bias = embedding(self.num_buckets, args.num_heads)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        n, out = self.num_buckets, torch.zeros_like(rel)
        if self.bidirectional:
            n //= 2
            out = (rel > 0).long() * n
            rel = rel.abs()
        else:
            rel = -rel.clamp(max=0)
        exact = n // 2
        # log-spaced buckets beyond `exact`, all distances >= max_distance in the last one
        large = exact + (torch.log(rel.clamp(min=1).float() / exact) / math.log(self.max_distance / exact)
                         * (n - exact)).long()
        large = large.clamp(max=n - 1)
        return out + torch.where(rel < exact, rel, large)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos (B, T), k_pos (B, S) -> bias (B, H, T, S)."""
        rel = k_pos[:, None, :] - q_pos[:, :, None]  # (B, T, S)
        return self.relative_attention_bias(self.bucket(rel)).permute(0, 3, 1, 2)


def masked_bias(bias: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    # the most negative finite value, not -inf: a fully masked row (an empty source) stays finite
    return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)


class SelfAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.hd = args.num_heads, args.d_kv
        self.qkv = Linear(args.d_model, 3 * args.num_heads * args.d_kv, bias=False)
        self.o = Linear(args.num_heads * args.d_kv, args.d_model, bias=False)

    def forward(self, x, mask, cache: KVCache | None = None, layer: int = 0):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3 * self.n_heads, self.hd).transpose(1, 2).chunk(3, dim=1)  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.o(attend(q, k, v, mask, 1.0))


class CrossAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.hd = args.num_heads, args.d_kv
        self.q = Linear(args.d_model, args.num_heads * args.d_kv, bias=False)
        self.kv = Linear(args.d_model, 2 * args.num_heads * args.d_kv, bias=False)
        self.o = Linear(args.num_heads * args.d_kv, args.d_model, bias=False)

    def project(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D) -> k, v (B, H, S, hd), computed once per source."""
        b, s, _ = memory.shape
        kv = self.kv(memory).view(b, s, 2 * self.n_heads, self.hd).transpose(1, 2)
        k, v = kv.chunk(2, dim=1)
        return k.contiguous(), v.contiguous()

    def forward(self, x, k, v, mask):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        return self.o(attend(q, k, v, mask, 1.0))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gated, self.d_ff, self.act = args.gated, args.d_ff, ACTIVATIONS[args.act]
        self.wi = Linear(args.d_model, (2 if args.gated else 1) * args.d_ff, bias=False)  # gated: [wi_0; wi_1]
        self.wo = Linear(args.d_ff, args.d_model, bias=False)

    def forward(self, x):
        if not self.gated:
            return self.wo(self.act(self.wi(x)))
        gate, up = fused_halves(self.wi, x, self.d_ff)
        return self.wo(self.act(gate) * up)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # as transformers: keep float16 activations finite (T5 v1.1 overflows in half precision)
    if x.dtype != torch.float16:
        return x
    big = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), big - 1000, big)
    return x.clamp(-limit, limit)


class EncoderBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.attn = SelfAttention(args)
        self.ffn_norm = LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.ffn = FeedForward(args)

    def forward(self, x, mask):
        x = clamp_fp16(x + self.attn(self.attn_norm(x), mask))
        return clamp_fp16(x + self.ffn(self.ffn_norm(x)))


class DecoderBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.attn = SelfAttention(args)
        self.cross_norm = LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.cross = CrossAttention(args)
        self.ffn_norm = LayerNorm(args.d_model, args.layer_norm_epsilon)
        self.ffn = FeedForward(args)

    def forward(self, x, self_mask, cross_mask, cache: KVCache, layer: int):
        x = clamp_fp16(x + self.attn(self.attn_norm(x), self_mask, cache, layer))
        x = clamp_fp16(x + self.cross(self.cross_norm(x), cache.cross_k[layer], cache.cross_v[layer], cross_mask))
        return clamp_fp16(x + self.ffn(self.ffn_norm(x)))


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.relative_bias = RelativeBias(args, bidirectional=True)
        self.layers = nn.ModuleList(EncoderBlock(args) for _ in range(args.num_layers))
        self.norm = LayerNorm(args.d_model, args.layer_norm_epsilon)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.relative_bias = RelativeBias(args, bidirectional=False)
        self.layers = nn.ModuleList(DecoderBlock(args) for _ in range(args.num_decoder_layers))
        self.norm = LayerNorm(args.d_model, args.layer_norm_epsilon)


class Model(nn.Module):
    is_encoder_decoder = True
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.shared = embedding(args.vocab_size, args.d_model)
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)
        self.lm_head = OutputHead(args.d_model, args.vocab_size, bias=False)

    @property
    def max_positions(self) -> int:
        """Longest decoder output; relative positions would allow more (see `ModelArgs.n_positions`)."""
        return self.args.n_positions

    @property
    def decoder_start_token_id(self) -> int:
        return self.args.decoder_start_token_id

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S), attention_mask (B, S) bool, True at real tokens -> memory (B, S, D).

        Relative positions make the padding side irrelevant: left or right padding gives the same
        memory at the real tokens (the memory at padding slots is junk, masked by `memory_mask`)."""
        b, s = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
        x = self.shared(input_ids)
        pos = torch.arange(s, device=input_ids.device)[None]  # (1, S)
        bias = self.encoder.relative_bias(pos, pos)  # (1, H, S, S)
        mask = masked_bias(bias, attention_mask.bool()[:, None, None, :])  # (B, H, S, S)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.encoder.norm(x)

    def make_cache(self, batch: int, max_len: int, dtype=torch.float32, device="cpu",
                   memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> KVCache:
        """Decoder self-attention cache; with `memory`, also the cross-attention keys/values."""
        a = self.args
        cache = KVCache(a.num_decoder_layers, batch, a.num_heads, a.d_kv, max_len, dtype, device)
        if memory is not None:
            if memory.shape[0] != batch:
                raise ValueError(f"memory has {memory.shape[0]} rows for a cache of {batch}")
            for layer in self.decoder.layers:
                k, v = layer.cross.project(memory)
                cache.cross_k.append(k)
                cache.cross_v.append(v)
            if memory_mask is None:
                memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
            cache.memory_mask = memory_mask.bool()
        return cache

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                last_only: bool = False, return_hidden: bool = False):
        """Decoder ids, position_ids (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only`.

        The cache must hold the cross-attention keys/values (`make_cache(memory=...)`).
        With `return_hidden`, also the final-norm output (B, T, D) of every position."""
        if not cache.cross_k:
            raise ValueError("the cache holds no encoder memory; build it with make_cache(memory=...)")
        x = self.shared(input_ids)
        k_pos = cache.begin(position_ids)
        bias = self.decoder.relative_bias(position_ids, k_pos)  # (B, H, T, S)
        self_mask = masked_bias(bias, attention_mask(position_ids, k_pos))
        cross_mask = cache.memory_mask[:, None, None, :]  # (B, 1, 1, S)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, self_mask, cross_mask, cache, i)
        cache.commit()
        if last_only and not return_hidden:
            x = x[:, -1:]
        hidden = self.decoder.norm(x)
        out = hidden[:, -1:] if last_only else hidden
        if self.args.scale_decoder_outputs:
            out = out * self.args.d_model ** -0.5
        logits = self.lm_head(out)
        return (logits, hidden) if return_hidden else logits

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        """HF checkpoint names -> ours: shorter names, fused projections, one shared embedding."""
        renames = [
            (r"^(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.",
             r"\1.relative_bias.relative_attention_bias."),
            (r"^(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.", r"\1.layers.\2.attn."),
            (r"^(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm\.", r"\1.layers.\2.attn_norm."),
            (r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.", r"decoder.layers.\1.cross."),
            (r"^decoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"decoder.layers.\1.cross_norm."),
            (r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.", r"decoder.layers.\1.ffn."),
            (r"^decoder\.block\.(\d+)\.layer\.2\.layer_norm\.", r"decoder.layers.\1.ffn_norm."),
            (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.", r"encoder.layers.\1.ffn."),
            (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"encoder.layers.\1.ffn_norm."),
            (r"^(encoder|decoder)\.final_layer_norm\.", r"\1.norm."),
        ]
        out = {}
        for k, v in weights.items():
            # an unused table some old checkpoints carry
            if k.endswith("EncDecAttention.relative_attention_bias.weight"):
                continue
            for pattern, repl in renames:
                k, n = re.subn(pattern, repl, k)
                if n:
                    break
            out[k] = v
        # encoder/decoder embed_tokens are aliases of `shared`; checkpoints may hold any of them
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in out:
                out.setdefault("shared.weight", out[alias])
                del out[alias]
        for stack, n_layers in (("encoder", args.num_layers), ("decoder", args.num_decoder_layers)):
            for i in range(n_layers):
                p = f"{stack}.layers.{i}."
                fuse(out, [p + f"attn.{n}.weight" for n in "qkv"], p + "attn.qkv.weight")
                fuse(out, [p + "ffn.wi_0.weight", p + "ffn.wi_1.weight"], p + "ffn.wi.weight")
                if stack == "decoder":
                    fuse(out, [p + "cross.k.weight", p + "cross.v.weight"], p + "cross.kv.weight")
        if "lm_head.weight" not in out and "shared.weight" in out:
            out["lm_head.weight"] = out["shared.weight"]  # tied head (T5 v1.0)
        return out
