"""BART-family encoder-decoders: BART, mBART and Marian (Opus-MT), switched by `model_type`.

- bart:   learned positions (offset 2), `layernorm_embedding`, post-norm blocks.
- mbart:  as BART but pre-norm blocks plus final `layer_norm` after encoder and decoder.
- marian: sinusoidal positions (sin | cos halves, no offset), no `layernorm_embedding`, post-norm;
          encoder and decoder vocabularies may differ (`share_encoder_decoder_embeddings=False`).

All three: token embeddings times sqrt(d_model) when `scale_embedding`, an output head tied to
the decoder embeddings with `final_logits_bias` as its bias. Self-attention q/k/v are fused into
one projection, cross-attention k/v into another, applied to the encoder output once in
`make_cache`.
References: Lewis et al. 2019 (BART), Liu et al. 2020 (mBART), Junczys-Dowmunt et al. 2018
(Marian); HF `modeling_bart.py`, `modeling_mbart.py`, `modeling_marian.py` are the oracles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.errors import ModelLoadError
from tokenloom.models.base import Linear, OutputHead, args_from_config, attend, attention_mask, fuse, embedding
from tokenloom.models.cache import KVCache

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

LEARNED_POSITION_OFFSET = 2  # fairseq reserved the first two rows of BART's position table


@dataclass
class ModelArgs:
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    vocab_size: int
    model_type: str = "bart"
    decoder_vocab_size: int | None = None  # Marian with separate target vocabulary
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    scale_embedding: bool = False
    tie_word_embeddings: bool = True
    share_encoder_decoder_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None
    # derived from model_type in from_config
    pre_norm: bool = False  # mBART: norm before each sub-layer, final norms after the stacks
    learned_positions: bool = True  # BART/mBART; Marian is sinusoidal
    embedding_norm: bool = True  # `layernorm_embedding` after embeddings + positions

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        args = args_from_config(cls, config)
        if args.model_type not in ("bart", "mbart", "marian"):
            raise ModelLoadError(f"unsupported BART-family model_type {args.model_type!r}")
        if args.activation_function not in ACTIVATIONS:
            raise ModelLoadError(f"unsupported activation_function {args.activation_function!r} "
                                 f"(supported: {', '.join(sorted(ACTIVATIONS))})")
        if args.d_model % args.encoder_attention_heads or args.d_model % args.decoder_attention_heads:
            raise ModelLoadError("d_model must be divisible by the number of attention heads")
        args.pre_norm = args.model_type == "mbart"
        args.learned_positions = args.model_type != "marian"
        args.embedding_norm = args.model_type != "marian"
        if args.model_type != "marian" or args.share_encoder_decoder_embeddings:
            args.decoder_vocab_size = args.vocab_size
        args.decoder_vocab_size = args.decoder_vocab_size or args.vocab_size
        if args.decoder_start_token_id is None:
            args.decoder_start_token_id = args.bos_token_id
        return args


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """Marian's table (n_pos, dim): sin of every frequency in the first half, cos in the second."""
    j = torch.arange(dim, dtype=torch.float64, device="cpu")
    pos = torch.arange(n_pos, dtype=torch.float64, device="cpu")[:, None]
    angles = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)  # (n_pos, dim)
    return torch.cat([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).float()


class Positions(nn.Module):
    """Absolute position embeddings: a learned table (offset 2) or Marian's fixed sinusoids."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.learned = args.learned_positions
        if self.learned:
            self.weight = nn.Parameter(torch.empty(args.max_position_embeddings + LEARNED_POSITION_OFFSET, args.d_model))
        else:
            # a plain attribute, not a buffer: built on the CPU even under the meta device, never loaded
            self.table = sinusoidal_table(args.max_position_embeddings, args.d_model)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        pos = position_ids.clamp(min=0)
        if self.learned:
            return F.embedding(pos + LEARNED_POSITION_OFFSET, self.weight)
        if self.table.device != pos.device:
            self.table = self.table.to(pos.device)
        return F.embedding(pos, self.table).to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int, layer: int = 0):
        super().__init__()
        self.layer, self.n_heads, self.hd = layer, n_heads, d // n_heads
        self.qkv_proj = Linear(d, 3 * d)
        self.out_proj = Linear(d, d)

    def forward(self, x, mask, cache: KVCache | None = None):
        b, t, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, t, 3 * self.n_heads, self.hd).transpose(1, 2).chunk(3, dim=1)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        return self.out_proj(attend(q, k, v, mask, None))  # SDPA's default scale is HF's head_dim**-0.5


class CrossAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads, self.hd = n_heads, d // n_heads
        self.q_proj = Linear(d, d)
        self.kv_proj = Linear(d, 2 * d)
        self.out_proj = Linear(d, d)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D) -> k, v (B, H, S, hd), computed once per source."""
        b, s, _ = memory.shape
        k, v = self.kv_proj(memory).view(b, s, 2 * self.n_heads, self.hd).transpose(1, 2).chunk(2, dim=1)
        return k.contiguous(), v.contiguous()

    def forward(self, x, k, v, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        return self.out_proj(attend(q, k, v, mask, None))


class FeedForward(nn.Module):
    def __init__(self, d: int, ffn: int, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = Linear(d, ffn), Linear(ffn, d), ACTIVATIONS[act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def residual(x, norm: nn.LayerNorm, fn, pre_norm: bool):
    """One sub-layer: pre-norm (mBART) `x + f(norm(x))` or post-norm (BART, Marian) `norm(x + f(x))`."""
    return x + fn(norm(x)) if pre_norm else norm(x + fn(x))


class EncoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d = args.d_model
        self.self_attn = SelfAttention(d, args.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = FeedForward(d, args.encoder_ffn_dim, args.activation_function)
        self.final_layer_norm = nn.LayerNorm(d)
        self.pre_norm = args.pre_norm

    def forward(self, x, mask):
        x = residual(x, self.self_attn_layer_norm, lambda h: self.self_attn(h, mask), self.pre_norm)
        return residual(x, self.final_layer_norm, self.mlp, self.pre_norm)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        d = args.d_model
        self.layer = layer
        self.self_attn = SelfAttention(d, args.decoder_attention_heads, layer)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = CrossAttention(d, args.decoder_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = FeedForward(d, args.decoder_ffn_dim, args.activation_function)
        self.final_layer_norm = nn.LayerNorm(d)
        self.pre_norm = args.pre_norm

    def forward(self, x, mask, cross_mask, cache: KVCache):
        x = residual(x, self.self_attn_layer_norm, lambda h: self.self_attn(h, mask, cache), self.pre_norm)
        k, v = cache.cross_k[self.layer], cache.cross_v[self.layer]
        x = residual(x, self.encoder_attn_layer_norm, lambda h: self.encoder_attn(h, k, v, cross_mask), self.pre_norm)
        return residual(x, self.final_layer_norm, self.mlp, self.pre_norm)


class Stack(nn.Module):
    """Embeddings and the norms around a stack of layers (encoder or decoder)."""

    def __init__(self, args: ModelArgs, vocab: int, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = embedding(vocab, args.d_model)
        self.embed_positions = Positions(args)
        self.layernorm_embedding = nn.LayerNorm(args.d_model) if args.embedding_norm else None
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(args.d_model) if args.pre_norm else None
        self.embed_scale = math.sqrt(args.d_model) if args.scale_embedding else 1.0

    def embed(self, input_ids, position_ids):
        x = self.embed_tokens(input_ids) * self.embed_scale
        x = x + self.embed_positions(position_ids, x.dtype)
        return self.layernorm_embedding(x) if self.layernorm_embedding is not None else x

    def final_norm(self, x):
        return self.layer_norm(x) if self.layer_norm is not None else x


class Model(nn.Module):
    is_encoder_decoder = True
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.encoder = Stack(args, args.vocab_size, [EncoderLayer(args) for _ in range(args.encoder_layers)])
        self.decoder = Stack(args, args.decoder_vocab_size,
                             [DecoderLayer(args, i) for i in range(args.decoder_layers)])
        self.lm_head = OutputHead(args.d_model, args.decoder_vocab_size, bias=True)  # bias = final_logits_bias

    @property
    def max_positions(self) -> int:
        return self.args.max_position_embeddings

    @property
    def decoder_start_token_id(self) -> int:
        return self.args.decoder_start_token_id

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) and mask (B, S), True at real tokens -> memory (B, S, D).

        Positions count real tokens only, so a row padded on either side encodes as it would alone
        (with right padding, as transformers does, they are 0..S-1)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        position_ids = attention_mask.long().cumsum(-1) - 1  # (B, S)
        x = self.encoder.embed(input_ids, position_ids)
        mask = attention_mask[:, None, None, :]  # (B, 1, 1, S): padding keys hidden from every query
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.encoder.final_norm(x)

    def make_cache(self, batch: int, max_len: int, dtype=torch.float32, device="cpu",
                   memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> KVCache:
        """Decoder self-attention cache; with `memory` (B, S, D), also each layer's cross-attention k/v."""
        a = self.args
        cache = KVCache(a.decoder_layers, batch, a.decoder_attention_heads, a.d_model // a.decoder_attention_heads,
                        max_len, dtype, device)
        if memory is not None:
            if memory.shape[0] != batch:
                raise ValueError(f"memory has {memory.shape[0]} rows, the cache {batch}")
            for layer in self.decoder.layers:
                k, v = layer.encoder_attn.project_memory(memory)
                cache.cross_k.append(k)
                cache.cross_v.append(v)
            if memory_mask is None:
                memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
            cache.memory_mask = memory_mask.bool()
        return cache

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                last_only: bool = False, return_hidden: bool = False):
        """Decoder ids, positions (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only`.

        `cache` must hold the cross-attention k/v (`make_cache(memory=...)`)."""
        if len(cache.cross_k) != self.args.decoder_layers or cache.memory_mask is None:
            raise ValueError("the cache holds no encoder memory: build it with make_cache(memory=...)")
        x = self.decoder.embed(input_ids, position_ids)
        mask = attention_mask(position_ids, cache.begin(position_ids))
        cross_mask = cache.memory_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.decoder.layers:
            x = layer(x, mask, cross_mask, cache)
        cache.commit()
        if last_only and not return_hidden:
            x = x[:, -1:]
        hidden = self.decoder.final_norm(x)  # (B, T, D): transformers' decoder_hidden_states[-1]
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        return (logits, hidden) if return_hidden else logits

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        """HF names -> ours: untie embeddings, fuse projections, final_logits_bias -> lm_head.bias."""
        out = {}
        for k, v in weights.items():
            k = k[len("model."):] if k.startswith("model.") else k
            if k.endswith(".version") or (not args.learned_positions and k.endswith("embed_positions.weight")):
                continue  # fairseq version markers; Marian's sinusoids are rebuilt, not loaded
            k = k.replace(".fc1.", ".mlp.fc1.").replace(".fc2.", ".mlp.fc2.")
            out[k] = v
        shared = out.pop("shared.weight", None)
        if shared is not None:
            out.setdefault("encoder.embed_tokens.weight", shared)
            if args.share_encoder_decoder_embeddings:
                out.setdefault("decoder.embed_tokens.weight", shared)
        for i in range(args.encoder_layers):
            p = f"encoder.layers.{i}.self_attn."
            for kind in ("weight", "bias"):
                fuse(out, [p + f"{n}_proj.{kind}" for n in "qkv"], p + f"qkv_proj.{kind}")
        for i in range(args.decoder_layers):
            p, c = f"decoder.layers.{i}.self_attn.", f"decoder.layers.{i}.encoder_attn."
            for kind in ("weight", "bias"):
                fuse(out, [p + f"{n}_proj.{kind}" for n in "qkv"], p + f"qkv_proj.{kind}")
                fuse(out, [c + f"{n}_proj.{kind}" for n in "kv"], c + f"kv_proj.{kind}")
        if args.tie_word_embeddings or "lm_head.weight" not in out:
            if "decoder.embed_tokens.weight" in out:
                out["lm_head.weight"] = out["decoder.embed_tokens.weight"]
        bias = out.pop("final_logits_bias", None)
        if bias is None and "lm_head.weight" in out:  # optional in HF: zeros when absent
            bias = torch.zeros(args.decoder_vocab_size, dtype=out["lm_head.weight"].dtype)
        if bias is not None:
            out["lm_head.bias"] = bias.reshape(-1)
        return out
