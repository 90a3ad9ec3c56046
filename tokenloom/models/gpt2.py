"""GPT-2: learned absolute positions, LayerNorm, fused QKV, GELU (tanh) MLP, tied head.

HF stores GPT-2's linear layers as Conv1D with (in, out) weights; `sanitize` transposes them.
Reference: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenloom.errors import ModelLoadError
from tokenloom.models.base import Linear, OutputHead, args_from_config, attend, attention_mask, embedding
from tokenloom.models.cache import KVCache


@dataclass
class ModelArgs:
    n_embd: int
    n_layer: int
    n_head: int
    vocab_size: int
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        args = args_from_config(cls, config)
        args.n_inner = args.n_inner or 4 * args.n_embd
        if args.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ModelLoadError(f"unsupported GPT-2 activation_function {args.activation_function!r}")
        return args


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.hd = layer, args.n_head, args.n_embd // args.n_head
        self.c_attn = Linear(args.n_embd, 3 * args.n_embd)
        self.c_proj = Linear(args.n_embd, args.n_embd)
        scale = self.hd ** -0.5 if args.scale_attn_weights else 1.0
        self.scale = scale / (layer + 1) if args.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x, mask, cache: KVCache):
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).view(b, t, 3 * self.n_heads, self.hd).transpose(1, 2).chunk(3, dim=1)
        k, v = cache.update(self.layer, k, v)
        return self.c_proj(attend(q, k, v, mask, self.scale))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.attn = Attention(args, layer)
        self.ln_2 = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.c_fc = Linear(args.n_embd, args.n_inner)
        self.c_proj = Linear(args.n_inner, args.n_embd)
        self.approximate = "none" if args.activation_function == "gelu" else "tanh"

    def forward(self, x, mask, cache):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate=self.approximate))


class Model(nn.Module):
    is_encoder_decoder = False
    separable_head = True  # forward(head=False) gives what lm_head turns into the logits
    Args = ModelArgs

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wte = embedding(args.vocab_size, args.n_embd)
        self.wpe = embedding(args.n_positions, args.n_embd)
        self.h = nn.ModuleList(Block(args, i) for i in range(args.n_layer))
        self.ln_f = nn.LayerNorm(args.n_embd, eps=args.layer_norm_epsilon)
        self.lm_head = OutputHead(args.n_embd, args.vocab_size, bias=False)

    @property
    def max_positions(self) -> int:
        return self.args.n_positions

    def make_cache(self, batch: int, max_len: int, dtype=torch.float32, device="cpu") -> KVCache:
        a = self.args
        return KVCache(a.n_layer, batch, a.n_head, a.n_embd // a.n_head, max_len, dtype, device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                last_only: bool = False, return_hidden: bool = False, head: bool = True):
        x = self.wte(input_ids) + self.wpe(position_ids.clamp(min=0))
        mask = attention_mask(position_ids, cache.begin(position_ids))
        for block in self.h:
            x = block(x, mask, cache)
        cache.commit()
        if last_only and not return_hidden:
            x = x[:, -1:]
        hidden = self.ln_f(x)  # (B, T, D): transformers' hidden_states[-1], for contrastive search
        if not head:  # the caller applies lm_head itself (a greedy step's argmax: engine.py)
            return hidden[:, -1:] if last_only else hidden
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        return (logits, hidden) if return_hidden else logits

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in weights.items():
            k = k[len("transformer."):] if k.startswith("transformer.") else k  # the original repo has no prefix
            if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
                continue  # old checkpoints store the causal mask as a buffer
            k = k.replace(".mlp.c_fc.", ".c_fc.").replace(".mlp.c_proj.", ".c_proj.")
            if k.endswith(".weight") and any(n in k for n in ("c_attn", "c_proj", "c_fc")):
                v = v.t().contiguous()  # Conv1D (in, out) -> Linear (out, in)
            out[k] = v
        out.setdefault("lm_head.weight", out.get("wte.weight"))
        return {k: v for k, v in out.items() if v is not None}
