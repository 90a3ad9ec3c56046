"""GGUF model files as Hugging Face checkpoints: config.json-style dict + HF-named weights.

`read_gguf` (in gguf_file.py) parses and validates the file; this module turns its
metadata into the `config.json` transformers would write for the same model, and its
tensors into the state dict of the matching transformers class, undoing what
llama.cpp's converter (convert_hf_to_gguf.py) changed on the way in:

- llama: Q and K rows were permuted so that ggml's rope rotates adjacent pairs
  (`LlamaModel.permute`); we apply the inverse so HF's rotate-half rope works.
  Qwen2 and Gemma 3 are converted without the permutation.
- gemma3: every `*norm.weight` was stored as w + 1 (HF's Gemma RMSNorm computes
  x * (1 + w), ggml's x * w); we subtract the 1 again.
- gpt2: HF's Conv1D weights are (in, out); the converter transposed them to (out, in).
- llama 3.x: the "llama3" rope scaling was baked into a `rope_freqs` tensor; we
  recover the `rope_scaling` dict from it.
- an absent `output.weight` means the output layer is tied to the embedding.

The same conventions are what transformers' own GGUF loader
(modeling_gguf_pytorch_utils.py, TENSOR_PROCESSORS) applies; tests compare the two.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from tokenloom.errors import GGUFError, UnsupportedArchitectureError
from tokenloom.loading.gguf_constants import GGML_QUANT_SIZES, GGMLQuantizationType
from tokenloom.loading.gguf_file import GGUFFile, GGUFTensorInfo, read_gguf
from tokenloom.loading.gguf_quants import SUPPORTED_TYPES, supported_type_names

__all__ = ["GGUFFile", "GGUFTensorInfo", "read_gguf", "gguf_to_hf_config", "load_gguf_state_dict",
           "SUPPORTED_ARCHITECTURES"]

SUPPORTED_ARCHITECTURES = ("gemma3", "gpt2", "llama", "qwen2")

# GGUF name suffix inside `blk.N.` -> HF name suffix inside the layer prefix
_DECODER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QKV_BIAS = {f"attn_{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}
_GEMMA3_LAYER = {
    **_DECODER_LAYER,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",  # Gemma's ffn_norm is the *pre*-FFN norm
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_GPT2_LAYER = {
    f"{g}.{p}": f"{h}.{p}"
    for g, h in [("attn_norm", "ln_1"), ("attn_qkv", "attn.c_attn"), ("attn_output", "attn.c_proj"),
                 ("ffn_norm", "ln_2"), ("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")]
    for p in ("weight", "bias")
}
_DECODER_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
_GPT2_GLOBAL = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
}
# stored (out, in) by the converter, (in, out) in HF's Conv1D
_GPT2_TRANSPOSED = {"attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"}


def _architecture(f: GGUFFile) -> str:
    arch = f.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{f.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def _clean_f32(x: float) -> float:
    """1e-06 rather than 9.999999974752427e-07: the shortest decimal that is the same float32.

    Values that are not float32 (a float64 key) are returned unchanged.
    """
    as_f32 = np.float32(x)
    return float(str(as_f32)) if float(as_f32) == x else float(x)


def _has_kind(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # bool is an int subclass; only accept it where asked for
        return kind is bool
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


class _Metadata:
    """Typed access to `{arch}.*` keys; a missing or ill-typed value is a GGUFError naming the key."""

    def __init__(self, f: GGUFFile, arch: str):
        self.f, self.arch = f, arch

    def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        if full not in self.f.metadata:
            if required:
                raise GGUFError(f"{self.f.path}: missing metadata key {full!r}")
            return default
        value = self.f.metadata[full]
        if not _has_kind(value, kind):
            raise GGUFError(f"{self.f.path}: metadata key {full!r} should be {kind.__name__}, "
                            f"got {type(value).__name__} {value!r}"[:300])
        if kind is int and value < 0:
            raise GGUFError(f"{self.f.path}: metadata key {full!r} is negative ({value})")
        return _clean_f32(value) if kind is float else value

    def positive(self, key: str, default: int | None = None) -> int:
        value = self.get(key, int, default, required=default is None)
        if value <= 0:
            raise GGUFError(f"{self.f.path}: metadata key '{self.arch}.{key}' must be positive, got {value}")
        return value


def gguf_to_hf_config(f: GGUFFile) -> dict:
    """The HF `config.json` dict (with `model_type`) of the model in `f`.

    Raises UnsupportedArchitectureError for an architecture other than
    llama / qwen2 / gemma3 / gpt2, GGUFError for missing or inconsistent metadata.
    """
    arch = _architecture(f)
    m = _Metadata(f, arch)
    hidden = m.positive("embedding_length")
    heads = m.positive("attention.head_count")
    n_layers = m.positive("block_count")
    if hidden % heads and m.get("attention.key_length", int) is None:
        raise GGUFError(f"{f.path}: embedding_length {hidden} is not divisible by head_count {heads}")
    common = {
        "vocab_size": _vocab_size(f, m),
        "tie_word_embeddings": "output.weight" not in f.tensors,
    }
    for key, hf_key in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")]:
        # optional and cosmetic for the weights: an odd value (say -1) is left out, not fatal
        token = f.metadata.get(f"tokenizer.ggml.{key}")
        if _has_kind(token, int) and token >= 0:
            common[hf_key] = token

    if arch == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "n_embd": hidden,
            "n_layer": n_layers,
            "n_head": heads,
            "n_inner": m.positive("feed_forward_length", 4 * hidden),
            "n_positions": m.positive("context_length"),
            "n_ctx": m.positive("context_length"),
            "layer_norm_epsilon": m.get("attention.layer_norm_epsilon", float, required=True),
            "activation_function": "gelu_new",
            **common,
        }

    head_dim = m.positive("attention.key_length", hidden // heads)
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": m.positive("feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": m.positive("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": m.get("attention.layer_norm_rms_epsilon", float, required=True),
        "rope_theta": m.get("rope.freq_base", float, 1_000_000.0 if arch == "gemma3" else 10_000.0),
        "max_position_embeddings": m.positive("context_length"),
        **common,
    }
    if heads % config["num_key_value_heads"]:
        raise GGUFError(f"{f.path}: head_count {heads} is not a multiple of head_count_kv "
                        f"{config['num_key_value_heads']}")
    rope_dims = m.get("rope.dimension_count", int)
    if rope_dims is not None and rope_dims != head_dim:
        raise GGUFError(f"{f.path}: partial rotary embeddings (rope.dimension_count {rope_dims} != head "
                        f"dim {head_dim}) are not supported")
    rope_scaling = _rope_scaling(f, m, config)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling

    if arch == "llama":
        config.update(architectures=["LlamaForCausalLM"], hidden_act="silu", mlp_bias=False,
                      attention_bias="blk.0.attn_q.bias" in f.tensors)
    elif arch == "qwen2":
        config.update(architectures=["Qwen2ForCausalLM"], hidden_act="silu", use_sliding_window=False)
    else:
        config.update(_gemma3_extras(f, m, config))
    return config


def _vocab_size(f: GGUFFile, m: _Metadata) -> int:
    # the embedding's row count is what the weights need; the metadata and the token
    # list are fallbacks (some files pad the embedding past the token list)
    embd = f.tensors.get("token_embd.weight")
    if embd is not None and len(embd.shape) == 2:
        return embd.shape[0]
    vocab = m.get("vocab_size", int)
    if vocab is None:
        tokens = f.metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise GGUFError(f"{f.path}: cannot tell the vocabulary size (no token_embd.weight, "
                            f"{m.arch}.vocab_size or tokenizer.ggml.tokens)")
        vocab = len(tokens)
    return vocab


def _gemma3_extras(f: GGUFFile, m: _Metadata, config: dict) -> dict:
    n_layers = config["num_hidden_layers"]
    # llama.cpp hardcodes 5 sliding-window layers then 1 global one (set_swa_pattern(6))
    # unless the file says otherwise; HF spells the same thing out as layer_types
    pattern = f.metadata.get(f"{m.arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(p, bool) for p in pattern):
            raise GGUFError(f"{f.path}: attention.sliding_window_pattern must be {n_layers} booleans")
        sliding = pattern
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern > 0:
        sliding = [(i + 1) % pattern != 0 for i in range(n_layers)]
    else:
        raise GGUFError(f"{f.path}: bad attention.sliding_window_pattern {pattern!r}")
    # llama.cpp scales attention by 1/sqrt(head_dim) except for Gemma 3 27B (62 layers),
    # which uses 1/sqrt(hidden / heads); HF stores that choice as query_pre_attn_scalar
    scalar = config["hidden_size"] // config["num_attention_heads"] if n_layers == 62 else config["head_dim"]
    return {
        "model_type": "gemma3_text",  # HF's name for the text-only Gemma 3 (Gemma3ForCausalLM)
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": scalar,
        "sliding_window": m.positive("attention.sliding_window"),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": m.get("rope.freq_base_swa", float, 10_000.0),
        "final_logit_softcapping": m.get("final_logit_softcapping", float),
        "attn_logit_softcapping": m.get("attn_logit_softcapping", float),
    }


def _rope_scaling(f: GGUFFile, m: _Metadata, config: dict) -> dict | None:
    kind = m.get("rope.scaling.type", str, "none")
    factor = m.get("rope.scaling.factor", float)
    legacy = m.get("rope.scale_linear", float)  # pre-2023 files
    if kind == "none" and legacy not in (None, 1.0):
        kind, factor = "linear", legacy
    if "rope_freqs.weight" in f.tensors:
        if m.arch != "llama" or kind != "none":
            raise GGUFError(f"{f.path}: rope_freqs.weight is only understood for llama without other rope scaling")
        return _llama3_rope_scaling(f, config)
    if kind == "none":
        return None
    if kind not in ("linear", "yarn") or factor is None:
        raise GGUFError(f"{f.path}: unsupported rope scaling {kind!r} (factor {factor})")
    scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = m.positive("rope.scaling.original_context_length")
        for key, hf_key in [("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")]:
            if (value := m.get(key, float)) is not None:
                scaling[hf_key] = value
    return scaling


def _llama3_rope_scaling(f: GGUFFile, config: dict) -> dict | None:
    """Recover HF's "llama3" rope_scaling from the per-frequency divisors llama.cpp stores.

    The converter writes, per rotary frequency, 1 (fast), `factor` (slow) or a smooth
    blend in between, from factor / low_freq_factor / high_freq_factor /
    original_max_position_embeddings. Every Llama 3.x uses 1 / 4 / 8192, so we take
    factor = the largest divisor, assume those three and check that they reproduce
    the tensor; anything else is refused rather than silently mis-rotated.
    """
    freqs = f.tensor("rope_freqs.weight").flatten().double()
    head_dim, theta = config["head_dim"], config["rope_theta"]
    if freqs.numel() != head_dim // 2:
        raise GGUFError(f"{f.path}: rope_freqs.weight has {freqs.numel()} entries, expected {head_dim // 2}")
    if torch.all(freqs == 1):
        return None
    scaling = {"rope_type": "llama3", "factor": _clean_f32(freqs.max().item()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old, low, high, factor = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                              scaling["high_freq_factor"], scaling["factor"])
    smooth = ((old / wavelen - low) / (high - low)).clamp(0, 1)
    expected = 1 / ((1 - smooth) / factor + smooth)
    if not torch.allclose(freqs, expected, rtol=1e-4):
        raise GGUFError(f"{f.path}: rope_freqs.weight does not match llama3 rope scaling "
                        f"(factor {factor}, low 1, high 4, original context 8192); not supported")
    return scaling


def _tensor_names(f: GGUFFile, arch: str, config: dict) -> tuple[dict[str, str], set[str]]:
    """(GGUF name -> HF name for every tensor the model needs, optional GGUF names)."""
    if arch == "gpt2":
        n_layers, prefix, layer, names = config["n_layer"], "transformer.h.{i}.", _GPT2_LAYER, dict(_GPT2_GLOBAL)
    else:
        n_layers, prefix, names = config["num_hidden_layers"], "model.layers.{i}.", dict(_DECODER_GLOBAL)
        layer = _GEMMA3_LAYER if arch == "gemma3" else dict(_DECODER_LAYER)
        if arch == "qwen2":
            layer.update(_QKV_BIAS)
        if arch == "llama" and config.get("attention_bias"):
            layer.update(_QKV_BIAS, {"attn_output.bias": "self_attn.o_proj.bias"})
    for i in range(n_layers):
        for g, h in layer.items():
            names[f"blk.{i}.{g}"] = prefix.format(i=i) + h
    optional = set()
    if config.get("tie_word_embeddings", "output.weight" not in f.tensors):
        optional.add("output.weight")
    names["output.weight"] = "lm_head.weight"
    if arch == "llama":
        optional.add("rope_freqs.weight")  # consumed by gguf_to_hf_config (rope_scaling)
    return names, optional


def _short_list(names: set[str] | list[str], limit: int = 8) -> str:
    names = sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def quantization_mode(f: GGUFFile) -> str | None:
    """How to run this file's weights packed: "int4" when most matrix weights are stored in 5 bits
    or fewer (Q4_0, Q4_1, Q4_K, Q2_K, Q3_K, ...), "int8" for other quantized files, None for
    float ones (F32 / F16 / BF16)."""
    counts = {"float": 0, "low": 0, "high": 0}
    for t in f.tensors.values():
        if len(t.shape) != 2 or t.name == "token_embd.weight":
            continue
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.ggml_type)]
        bits = 8 * size / block
        kind = "float" if block == 1 else "low" if bits <= 5.0 else "high"
        counts[kind] += math.prod(t.shape)
    if counts["float"] >= counts["low"] + counts["high"]:
        return None
    return "int4" if counts["low"] > counts["high"] else "int8"


def load_gguf_state_dict(f: GGUFFile, config: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All weights of `f`, dequantized to `dtype`, with HF parameter names and layouts.

    `config` is the dict from `gguf_to_hf_config(f)`. Missing, unexpected or
    undecodable tensors are all reported at once, before any data is read.
    """
    arch = _architecture(f)
    names, optional = _tensor_names(f, arch, config)
    present = set(f.tensors)
    missing = set(names) - present - optional
    unexpected = present - set(names) - optional
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_short_list(unexpected)}")
    undecodable = [f"{n} ({f.tensors[n].type_name})" for n in sorted(present & set(names))
                   if f.tensors[n].ggml_type not in SUPPORTED_TYPES]
    if undecodable:
        problems.append(f"tensor types tokenloom cannot dequantize: {_short_list(undecodable)} "
                        f"(supported: {supported_type_names()})")
    if problems:
        raise GGUFError(f"{f.path} does not match a {arch} model: " + "; ".join(problems))

    state = {}
    for gguf_name, hf_name in names.items():
        if gguf_name in present:
            state[hf_name] = _convert(f, arch, gguf_name, config, dtype)
    return state


def _convert(f: GGUFFile, arch: str, name: str, config: dict, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize one tensor and undo the converter's change to it, if any."""
    suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if arch == "gemma3" and name.endswith("norm.weight"):
        # the +1 came from float32 math in the converter; undo it in float32 too
        return (f.tensor(name, torch.float32) - 1).to(dtype)
    t = f.tensor(name, dtype)
    if arch == "llama" and suffix.startswith(("attn_q.", "attn_k.")):
        heads = config["num_attention_heads"] if suffix.startswith("attn_q.") else config["num_key_value_heads"]
        t = _unpermute(f, name, t, heads)
    elif arch == "gpt2" and suffix in _GPT2_TRANSPOSED:
        t = t.t().contiguous()
    return t


def _unpermute(f: GGUFFile, name: str, t: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of convert_hf_to_gguf's `LlamaModel.permute` on the rows of Q or K (or their bias).

    Per head, the converter interleaved the two rotary halves (rows 0, d/2, 1, d/2+1, ...);
    reading the rows as (head, d/2, 2) and swapping the last two axes restores HF's order.
    """
    rows = t.shape[0]
    if rows % (2 * heads):
        raise GGUFError(f"{f.path}: tensor {name!r} has {rows} rows, not a multiple of 2 x {heads} heads")
    return t.reshape(heads, rows // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
