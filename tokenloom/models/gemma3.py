"""Gemma 3 text decoder.

Differences from Llama: embeddings scaled by sqrt(hidden_size); RMSNorm as x * (1 + w);
RMS-normalised queries and keys; four norms per block (around attention and MLP); GELU-tanh
gated MLP; attention scaled by `query_pre_attn_scalar`; sliding-window layers (5 of every 6)
with their own rope base. Reference: Gemma Team 2025, "Gemma 3 Technical Report";
HF `modeling_gemma3.py` is the numerical oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.errors import ModelLoadError
from tokenloom.models.base import Linear, OutputHead, RMSNorm, Rotary, apply_rotary, args_from_config, attend, attention_mask, fuse, fused_halves, rope_parameters, embedding
from tokenloom.models.cache import KVCache

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ModelArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    layer_types: list[str] | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    rope: dict = field(default_factory=dict)  # layer type -> rope parameters

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        args = args_from_config(cls, config)
        if args.layer_types is None:
            pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", 6))
            args.layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(args.num_hidden_layers)]
        args.rope = {t: rope_parameters(config, t) for t in (SLIDING, FULL)}
        if args.attn_logit_softcapping is not None:
            raise ModelLoadError("attention logit soft-capping (Gemma 2) is not supported")
        if args.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelLoadError(f"unsupported hidden_activation {args.hidden_activation!r} for Gemma 3")
        return args


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.qkv_proj = Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=args.attention_bias)
        self.o_proj = Linear(self.n_heads * self.hd, args.hidden_size, bias=args.attention_bias)
        self.q_norm = RMSNorm(self.hd, args.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(self.hd, args.rms_norm_eps, offset=1.0)
        self.scale = args.query_pre_attn_scalar ** -0.5

    def forward(self, x, cos, sin, mask, cache: KVCache):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x).view(b, t, self.n_heads + 2 * self.n_kv, self.hd).transpose(1, 2)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)  # (B, h, T, hd)
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        k, v = cache.update(self.layer, k, v)
        return self.o_proj(attend(q, k, v, mask, self.scale))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.intermediate = args.intermediate_size

    def forward(self, x):
        gate, up = fused_halves(self.gate_up_proj, x, self.intermediate)
        return self.down_proj(F.gelu(gate, approximate="tanh").mul_(up))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        d, eps = args.hidden_size, args.rms_norm_eps
        self.sliding = args.layer_types[layer] == SLIDING
        self.input_layernorm = RMSNorm(d, eps, offset=1.0)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(d, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, offset=1.0)
        self.mlp = MLP(args)
        self.post_feedforward_layernorm = RMSNorm(d, eps, offset=1.0)

    def forward(self, x, rope, masks, cache):
        kind = SLIDING if self.sliding else FULL
        cos, sin = rope[kind]
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, masks[kind], cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Model(nn.Module):
    is_encoder_decoder = False
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, offset=1.0)
        self.lm_head = OutputHead(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = {t: Rotary(args.rope[t], args.head_dim) for t in (SLIDING, FULL)}

    @property
    def separable_head(self) -> bool:
        """Whether forward(head=False) gives what lm_head alone turns into the logits: not with
        Gemma 2-style soft-capping, whose tanh could tie distinct maxima in float32."""
        return not self.args.final_logit_softcapping

    @property
    def max_positions(self) -> int:
        return self.args.max_position_embeddings

    def make_cache(self, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, batch, a.num_key_value_heads, a.head_dim, max_len, dtype, device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                last_only: bool = False, return_hidden: bool = False, head: bool = True):
        x = self.embed_tokens(input_ids)
        # HF rounds the scale to the activation dtype before multiplying
        x = x * torch.tensor(self.args.hidden_size ** 0.5, dtype=x.dtype)
        key_pos = cache.begin(position_ids)
        masks = {SLIDING: attention_mask(position_ids, key_pos, self.args.sliding_window),
                 FULL: attention_mask(position_ids, key_pos)}
        rope = {t: r(position_ids, x.dtype) for t, r in self.rotary.items()}
        for layer in self.layers:
            x = layer(x, rope, masks, cache)
        cache.commit()
        if last_only and not return_hidden:
            x = x[:, -1:]
        hidden = self.norm(x)  # (B, T, D): transformers' hidden_states[-1], for contrastive search
        if not head:  # the caller applies lm_head itself (a greedy step's argmax: engine.py)
            return hidden[:, -1:] if last_only else hidden
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        if self.args.final_logit_softcapping:
            cap = self.args.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return (logits, hidden) if return_hidden else logits

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in weights.items():
            if "vision_tower" in k or "multi_modal_projector" in k or "rotary_emb" in k:
                continue  # multimodal checkpoints: keep the language model only
            for prefix in ("model.language_model.", "language_model.model.", "model."):
                if k.startswith(prefix):
                    k = k[len(prefix):]
                    break
            out[k] = v
        for i in range(args.num_hidden_layers):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                fuse(out, [p + f"self_attn.{n}_proj.{kind}" for n in "qkv"], p + f"self_attn.qkv_proj.{kind}")
            fuse(out, [p + f"mlp.{n}_proj.weight" for n in ("gate", "up")], p + "mlp.gate_up_proj.weight")
        if args.tie_word_embeddings or "lm_head.weight" not in out:
            out["lm_head.weight"] = out.get("embed_tokens.weight")
        return {k: v for k, v in out.items() if v is not None}
