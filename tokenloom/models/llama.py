"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral; Qwen2 via `attention_bias`).

Pre-norm transformer with RMSNorm, rotary embeddings, grouped-query attention and a SwiGLU
MLP. Q/K/V and gate/up projections are fused into one matmul each at load time.
Reference: Touvron et al. 2023, "Llama 2"; HF `modeling_llama.py` is the numerical oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom import kernels
from tokenloom.models.base import (Linear, OutputHead, RMSNorm, Rotary, apply_rotary, args_from_config, attend, attention_mask,
                                   embedding, fuse, fused_decode_ok, fused_halves, rope_parameters)
from tokenloom.models.cache import KVCache
from tokenloom.models.quant import Q4Linear


@dataclass
class ModelArgs:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    o_proj_bias: bool | None = None  # Llama: same as attention_bias; Qwen2: False
    sliding_window: int | None = None  # Mistral v0.1 uses one on every layer
    rope: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        args = args_from_config(cls, config)
        args.num_key_value_heads = args.num_key_value_heads or args.num_attention_heads
        args.head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
        args.rope = rope_parameters(config)
        if args.o_proj_bias is None:
            args.o_proj_bias = args.attention_bias
        if args.hidden_act != "silu":
            from tokenloom.errors import ModelLoadError
            raise ModelLoadError(f"unsupported hidden_act {args.hidden_act!r} for a Llama-style model (supported: silu)")
        return args


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.qkv_proj = Linear(args.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd, bias=args.attention_bias)
        self.o_proj = Linear(self.n_heads * self.hd, args.hidden_size, bias=args.o_proj_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        if t == 1 and fused_decode_ok(qkv, mask, cache, self.hd):
            # rotary, the cache write and attention in one kernel call instead of ~25 small ops
            k_all, v_all, rows, cols, end = cache.slot_write(self.layer)
            out = kernels.rope_attention(qkv.view(b, -1), cos.view(b, -1), sin.view(b, -1), k_all, v_all, rows,
                                         cols, end, mask.view(b, -1), self.hd ** -0.5, self.n_heads)
            return self.o_proj(out.view(b, 1, -1))
        qkv = qkv.view(b, t, self.n_heads + 2 * self.n_kv, self.hd).transpose(1, 2)
        # (B, h, T, hd); q and k rotate together, in one set of element-wise ops
        qk = apply_rotary(qkv[:, :self.n_heads + self.n_kv], cos, sin)
        q, k, v = qk[:, :self.n_heads], qk[:, self.n_heads:], qkv[:, self.n_heads + self.n_kv:]
        k, v = cache.update(self.layer, k, v)
        return self.o_proj(attend(q, k, v, mask, None))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.intermediate = args.intermediate_size

    def forward(self, x):
        gate, up = fused_halves(self.gate_up_proj, x, self.intermediate)
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    _fused: tuple | None = None

    def fused_weights(self) -> bool:
        """Whether the fused kernel can run this block (every projection packed as Q4_1, plain
        RMSNorms, head dim a multiple of 8); its arguments are gathered on first use."""
        if self._fused is None:
            a, m = self.self_attn, self.mlp
            lins = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
            norms = (self.input_layernorm, self.post_attention_layernorm)
            ok = (all(isinstance(p, Q4Linear) for p in lins) and a.hd % 8 == 0
                  and all(type(n) is RMSNorm and not n.offset and n.weight.dtype == torch.float32 for n in norms))
            self._fused = ()
            if ok:
                qkv, o, gate_up, down = [(p.codes, p.scales, p.bias) for p in lins]
                self._fused = (norms[0].weight.detach(), norms[1].weight.detach(), float(norms[0].eps),
                               qkv, o, gate_up, m.intermediate, down, a.n_heads, a.n_kv, a.hd, a.hd ** -0.5)
        return bool(self._fused)


class Model(nn.Module):
    is_encoder_decoder = False
    separable_head = True  # forward(head=False) gives what lm_head turns into the logits
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = OutputHead(args.hidden_size, args.vocab_size, bias=False)
        self.rotary = Rotary(args.rope, args.head_dim)

    @property
    def max_positions(self) -> int:
        return self.args.max_position_embeddings

    def make_cache(self, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> KVCache:
        a = self.args
        return KVCache(a.num_hidden_layers, batch, a.num_key_value_heads, a.head_dim, max_len, dtype, device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                last_only: bool = False, return_hidden: bool = False, head: bool = True):
        """input_ids, position_ids (B, T) -> logits (B, T, V), or (B, 1, V) with `last_only`.

        With `return_hidden`, also the final-norm output (B, T, D) of every position. With
        `head=False`, that output instead of the logits (engine.py: a greedy step's argmax)."""
        x = self.embed_tokens(input_ids)
        mask = attention_mask(position_ids, cache.begin(position_ids), self.args.sliding_window)
        cos, sin = self.rotary(position_ids, x.dtype)
        n = x.shape[0] * x.shape[1]
        if fused_decode_ok(x, mask, cache, self.args.head_dim) and self.fused_weights():
            # every block in one kernel call (Q4_1 projections only), decode steps and prompt chunks
            # alike: a 512-token prefill ran ~1.3x faster than module by module
            kv = [cache.slot_write(i) for i in range(len(self.layers))]
            _, _, rows, cols, end = kv[0]
            x = kernels.llama_layers([b._fused for b in self.layers], self._table, [c[:2] for c in kv], x,
                                     cos.reshape(n, -1), sin.reshape(n, -1), rows, cols, end, mask.reshape(n, -1))
        else:
            for layer in self.layers:
                x = layer(x, cos, sin, mask, cache)
        cache.commit()
        if last_only and not return_hidden:
            x = x[:, -1:]
        hidden = self.norm(x)  # (B, T, D): transformers' hidden_states[-1], for contrastive search
        if not head:  # the caller applies lm_head itself (a greedy step's argmax: engine.py)
            return hidden[:, -1:] if last_only else hidden
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        return (logits, hidden) if return_hidden else logits

    _table: torch.Tensor | None = None

    def fused_weights(self) -> bool:
        """Whether every block can run fused (Block.fused_weights); then the blocks' pointer table
        for kernels.llama_layers is built on first use."""
        if not all(b.fused_weights() for b in self.layers):
            return False
        if self._table is None:
            self._table = kernels.layer_table([b._fused for b in self.layers])
        return True

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        """HF checkpoint names -> ours: drop the `model.` prefix, fuse projections, tie the head."""
        out = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in weights.items()
               if "rotary_emb.inv_freq" not in k}
        for i in range(args.num_hidden_layers):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                fuse(out, [p + f"self_attn.{n}_proj.{kind}" for n in "qkv"], p + f"self_attn.qkv_proj.{kind}")
                fuse(out, [p + f"mlp.{n}_proj.{kind}" for n in ("gate", "up")], p + f"mlp.gate_up_proj.{kind}")
        if args.tie_word_embeddings and "embed_tokens.weight" in out:
            out["lm_head.weight"] = out["embed_tokens.weight"]
        return out
