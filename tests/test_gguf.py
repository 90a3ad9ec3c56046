"""GGUF reading: strict validation, dequantization, HF name mapping and checkpoint quirks.

Corrupt files are written byte by byte with struct; valid ones with gguf.GGUFWriter.
Tiny random transformers models are "converted" the way llama.cpp's
convert_hf_to_gguf.py does it (gguf's own HF->GGUF name map, Q/K permutation for
llama, +1 on Gemma norms, transposed GPT-2 Conv1D weights) and must come back
unchanged. The slow test compares with transformers' GGUF loader on a real file.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gguf
import gguf.quants as gq
import numpy as np
import pytest
import torch
import transformers
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from tokenloom.errors import GGUFError, UnsupportedArchitectureError
from tokenloom.loading import gguf_quants
from tokenloom.loading.gguf import gguf_to_hf_config, load_gguf_state_dict, read_gguf

transformers.logging.set_verbosity_error()


# ---------------------------------------------------------------------------
# hand-made GGUF bytes


def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _str(key) + struct.pack("<II", 4, value)


def _kv_str(key: str, value: str) -> bytes:
    return _str(key) + struct.pack("<I", 8) + _str(value)


def _info(name: str, ne: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


def _gguf_bytes(kvs=(), infos=(), data=b"", *, version=3, n_tensors=None, n_kv=None, magic=b"GGUF",
                alignment=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % alignment) + data


def _valid_bytes() -> bytes:
    """Two F32 tensors of 8 floats each, 32-byte aligned."""
    data = np.arange(16, dtype=np.float32).tobytes()
    return _gguf_bytes([_kv_str("general.architecture", "llama"), _kv_u32("llama.block_count", 1)],
                       [_info("a", [8], 0, 0), _info("b", [4, 2], 0, 32)], data)


def _write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_valid_hand_made_file_parses(tmp_path):
    f = read_gguf(_write(tmp_path, _valid_bytes()))
    assert f.version == 3
    assert f.metadata == {"general.architecture": "llama", "llama.block_count": 1}
    assert f.tensors["b"].shape == (2, 4)  # torch order: reversed ne
    assert torch.equal(f.tensor("a"), torch.arange(8, dtype=torch.float32))
    assert torch.equal(f.tensor("b"), torch.arange(8, 16, dtype=torch.float32).view(2, 4))
    f.close()


ARRAY_U32 = 9
CORRUPT_CASES = {
    "empty file": (b"", "empty"),
    "wrong magic": (b"GGML" + _valid_bytes()[4:], "not a GGUF file"),
    "version 1": (_gguf_bytes(version=1), "unsupported GGUF version 1"),
    "version 99": (_gguf_bytes(version=99), "unsupported GGUF version 99"),
    "big endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "header cut short": (b"GGUF\x03\x00\x00\x00\x01", "truncated"),
    "absurd tensor count": (_gguf_bytes(n_tensors=2**40), "more than the file could hold"),
    "absurd kv count": (_gguf_bytes(n_kv=2**62), "more than the file could hold"),
    "key length past end": (_gguf_bytes([struct.pack("<Q", 2**50) + b"key"]), "string length past end"),
    "string value past end": (_gguf_bytes([_str("k") + struct.pack("<IQ", 8, 10**12) + b"abc"]),
                              "string length past end"),
    "array length past end": (_gguf_bytes([_str("k") + struct.pack("<IIQ", ARRAY_U32, 4, 2**60)]),
                              "array length past end"),
    "unknown value type": (_gguf_bytes([_str("k") + struct.pack("<II", 99, 0)]), "unknown value type 99"),
    "unknown array element type": (_gguf_bytes([_str("k") + struct.pack("<IIQ", ARRAY_U32, 77, 1) + b"\0" * 8]),
                                   "unknown array element type 77"),
    "key not utf-8": (_gguf_bytes([_str(b"\xff\xfe") + struct.pack("<II", 4, 1)]), "UTF-8"),
    "duplicate key": (_gguf_bytes([_kv_u32("a.b", 1), _kv_u32("a.b", 2)]), "duplicate metadata key 'a.b'"),
    "bad alignment": (_gguf_bytes([_kv_u32("general.alignment", 3)]), "power of two"),
    "too many dims": (_gguf_bytes(infos=[_info("t", [1] * 5)]), "5 dimensions"),
    "unknown ggml type": (_gguf_bytes(infos=[_info("t", [32], 99)], data=b"\0" * 128), "unknown ggml type 99"),
    "shape not whole blocks": (_gguf_bytes(infos=[_info("t", [30, 2], int(Q.Q8_0))], data=b"\0" * 128),
                               "not a multiple of the Q8_0 block size 32"),
    "misaligned offset": (_gguf_bytes(infos=[_info("t", [4], 0, 4)], data=b"\0" * 64), "misaligned"),
    "offset past end": (_gguf_bytes(infos=[_info("t", [4], 0, 2**40)], data=b"\0" * 64), "runs past the end"),
    "data truncated": (_valid_bytes()[:-8], "runs past the end"),
    "duplicate tensor": (_gguf_bytes(infos=[_info("t", [4]), _info("t", [4], 0, 32)], data=b"\0" * 64),
                         "duplicate tensor name 't'"),
    "overlapping tensors": (_gguf_bytes(infos=[_info("t", [16]), _info("u", [8], 0, 32)], data=b"\0" * 64),
                            "overlap"),
    "split file": (_gguf_bytes([_kv_u32("split.count", 3)]), "3-part split"),
}


@pytest.mark.parametrize("case", list(CORRUPT_CASES))
def test_corrupt_file_raises_clear_error_fast(tmp_path, case):
    data, phrase = CORRUPT_CASES[case]
    path = _write(tmp_path, data)
    start = time.perf_counter()
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    assert time.perf_counter() - start < 1.0  # never reads or allocates what a header claims
    message = str(info.value)
    assert phrase in message
    assert str(path) in message
    assert "\n" not in message


def test_truncated_at_every_header_byte_raises_gguf_error(tmp_path):
    data = _valid_bytes()
    header_end = len(data) - 64
    for cut in range(header_end):
        path = _write(tmp_path, data[:cut])
        with pytest.raises(GGUFError):
            read_gguf(path)


def test_missing_file_raises_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="cannot read GGUF file"):
        read_gguf(tmp_path / "nope.gguf")


def test_reading_a_file_loads_only_the_gguf_packages_constants(tmp_path):
    """`import gguf` would also load its writer, sentencepiece and yaml (3.7 MB of RSS)."""
    path = _write(tmp_path, _valid_bytes())
    code = (f"import sys; from tokenloom.loading.gguf import read_gguf; f = read_gguf({str(path)!r}); "
            "print(len(f.tensors), sorted(m for m in sys.modules if m.split('.')[0] in ('gguf', 'sentencepiece', 'yaml')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split(maxsplit=1)[1].strip() == "[]" and int(out.split()[0]) > 0


# ---------------------------------------------------------------------------
# valid files written by gguf.GGUFWriter


def _write_gguf(path: Path, arch: str, kv: dict, tensors: dict[str, tuple[np.ndarray, Q | None]]) -> Path:
    """kv: key -> (value, GGUFValueType or None for a string / array); tensors: name -> (array, raw type)."""
    w = gguf.GGUFWriter(path, arch)
    for key, (value, vtype) in kv.items():
        if vtype is None:
            w.add_array(key, value) if isinstance(value, list) else w.add_string(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for name, (array, raw_type) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_values_round_trip(tmp_path):
    V = gguf.GGUFValueType
    kv = {
        "t.u8": (200, V.UINT8), "t.i8": (-100, V.INT8), "t.u16": (60000, V.UINT16), "t.i16": (-30000, V.INT16),
        "t.u32": (4_000_000_000, V.UINT32), "t.i32": (-2_000_000_000, V.INT32), "t.f32": (0.5, V.FLOAT32),
        "t.bool": (True, V.BOOL), "t.u64": (2**63, V.UINT64), "t.i64": (-(2**62), V.INT64),
        "t.f64": (1 / 3, V.FLOAT64), "t.str": ("héllo", None), "t.strs": (["a", "", "ü"], None),
        "t.ints": ([1, -2, 3], None), "t.floats": ([0.25, 1.5], None), "t.bools": ([True, False], None),
    }
    f = read_gguf(_write_gguf(tmp_path / "m.gguf", "llama", kv, {"x": (np.ones((3, 32), np.float32), None)}))
    for key, (value, _) in kv.items():
        assert f.metadata[key] == value, key
        assert type(f.metadata[key]) is type(value), key
    assert f.metadata["general.architecture"] == "llama"


def test_nested_array_round_trips(tmp_path):
    f = read_gguf(_write_gguf(tmp_path / "m.gguf", "llama", {"t.nested": ([[1, 2], [3]], None)}, {}))
    assert f.metadata["t.nested"] == [[1, 2], [3]]


def _sane_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `qtype` whose fp16 scales are finite and modest (random bytes would give NaN/inf)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.BF16):
        # these have a reference quantizer: use realistic data
        return gq.quantize(rng.standard_normal((n_blocks, block_size)).astype(np.float32), qtype)
    if qtype == Q.F16:
        return rng.standard_normal((n_blocks, 1)).astype(np.float16).view(np.uint8)
    if qtype == Q.F32:
        return rng.standard_normal((n_blocks, 1)).astype(np.float32).view(np.uint8)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scale_at = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}[qtype]
    for at in scale_at:
        scales = (rng.random(n_blocks) * 0.01 + 1e-4).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_equals_gguf_numpy_reference(qtype, monkeypatch):
    monkeypatch.setattr(gguf_quants, "_CHUNK_WEIGHTS", 1000)  # exercise several chunks
    rng = np.random.default_rng(int(qtype))
    blocks = _sane_blocks(qtype, 96, rng)
    expected = torch.from_numpy(gq.dequantize(blocks.reshape(4, -1), qtype).reshape(-1).copy())
    got = gguf_quants.dequantize(torch.from_numpy(blocks.reshape(-1).copy()), qtype)
    assert got.dtype == torch.float32
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    assert torch.equal(got, expected)
    assert torch.equal(gguf_quants.dequantize(torch.from_numpy(blocks.reshape(-1).copy()), qtype, torch.bfloat16),
                       expected.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F16], ids=lambda t: t.name)
def test_tensor_from_file_matches_reference_and_gguf_reader(tmp_path, qtype):
    rng = np.random.default_rng(0)
    block_size = GGML_QUANT_SIZES[qtype][0]
    rows, cols = 6, 2 * max(block_size, 32)
    raw = _sane_blocks(qtype, rows * cols // block_size, rng).reshape(rows, -1)
    path = _write_gguf(tmp_path / "m.gguf", "llama", {}, {"w": (raw, qtype), "n": (np.ones(7, np.float32), None)})
    f = read_gguf(path)
    info = f.tensors["w"]
    assert info.shape == (rows, cols) and info.ggml_type == qtype
    ref = gguf.GGUFReader(path)
    ref_w = next(t for t in ref.tensors if t.name == "w")
    assert info.offset == ref_w.data_offset and info.nbytes == ref_w.n_bytes
    assert torch.equal(f.tensor("w"), torch.from_numpy(gq.dequantize(ref_w.data, qtype).copy()))
    assert torch.equal(f.tensor("n"), torch.ones(7))


def test_unsupported_quant_type_is_readable_but_not_decodable(tmp_path):
    iq4_nl = np.zeros((2, 18), np.uint8)  # IQ4_NL: valid ggml type without a tokenloom dequantizer
    f = read_gguf(_write_gguf(tmp_path / "m.gguf", "llama", {}, {"w": (iq4_nl, Q.IQ4_NL)}))
    assert f.tensors["w"].shape == (2, 32)
    with pytest.raises(GGUFError, match="IQ4_NL, which tokenloom cannot dequantize"):
        f.tensor("w")
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        f.tensor("nope")


# ---------------------------------------------------------------------------
# tiny transformers models converted like llama.cpp does


def _permute_like_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute: interleave the two rotary halves of every head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert(model, arch: gguf.MODEL_ARCH, path: Path, kv: dict, *, tied: bool,
             quant: dict[str, Q] | None = None, extra: dict | None = None) -> Path:
    cfg = model.config
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tensors = {}
    for hf_name, w in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        w = w.detach().float()
        if arch == gguf.MODEL_ARCH.LLAMA and ".q_proj." in hf_name:
            w = _permute_like_llama_cpp(w, cfg.num_attention_heads)
        if arch == gguf.MODEL_ARCH.LLAMA and ".k_proj." in hf_name:
            w = _permute_like_llama_cpp(w, cfg.num_key_value_heads)
        if arch == gguf.MODEL_ARCH.GEMMA3 and hf_name.endswith("norm.weight"):
            w = w + 1
        if arch == gguf.MODEL_ARCH.GPT2 and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            w = w.T
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        array = np.ascontiguousarray(w.numpy())
        qtype = (quant or {}).get(name)
        tensors[name] = (gq.quantize(array, qtype), qtype) if qtype else (array, None)
    tensors.update(extra or {})
    return _write_gguf(path, gguf.MODEL_ARCH_NAMES[arch], kv, tensors)


def _llama_kv(arch: str, cfg, **more) -> dict:
    V = gguf.GGUFValueType
    kv = {
        f"{arch}.context_length": (cfg.max_position_embeddings, V.UINT32),
        f"{arch}.embedding_length": (cfg.hidden_size, V.UINT32),
        f"{arch}.block_count": (cfg.num_hidden_layers, V.UINT32),
        f"{arch}.feed_forward_length": (cfg.intermediate_size, V.UINT32),
        f"{arch}.attention.head_count": (cfg.num_attention_heads, V.UINT32),
        f"{arch}.attention.head_count_kv": (cfg.num_key_value_heads, V.UINT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (cfg.rms_norm_eps, V.FLOAT32),
        f"{arch}.rope.freq_base": (cfg.rope_parameters["rope_theta"], V.FLOAT32),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32),
    }
    kv.update(more)
    return kv


def _tiny_llama(tie: bool = False, **kw):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, **kw)
    return transformers.LlamaForCausalLM(cfg).eval()


def _assert_same_state(ours: dict, model, tied: bool, norm_atol: float = 0.0) -> None:
    """Bit-identical weights; `norm_atol` allows for (w + 1) - 1 rounding in float32."""
    ref = dict(model.state_dict())
    if tied:
        del ref["lm_head.weight"]
    assert set(ours) == set(ref)
    for name, t in ours.items():
        atol = norm_atol if name.endswith("norm.weight") else 0.0
        torch.testing.assert_close(t, ref[name].float(), rtol=0, atol=atol, msg=name)


def _assert_same_logits(config: dict, state: dict, model) -> None:
    """Our config + state dict rebuild a transformers model that computes the same logits."""
    rebuilt_cfg = transformers.AutoConfig.for_model(**config)
    rebuilt = transformers.AutoModelForCausalLM.from_config(rebuilt_cfg).eval()
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    ids = torch.tensor([[1, 5, 9, 33, 2, 70, 11, 4]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_llama_roundtrip_unpermutes_q_and_k(tmp_path):
    model = _tiny_llama()
    path = _convert(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "l.gguf", _llama_kv("llama", model.config), tied=False)
    f = read_gguf(path)
    config = gguf_to_hf_config(f)
    assert config["model_type"] == "llama"
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "intermediate_size", "vocab_size")} == \
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "intermediate_size": 128, "vocab_size": 96}
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 10000.0
    assert config["tie_word_embeddings"] is False
    assert config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    state = load_gguf_state_dict(f, config)
    _assert_same_state(state, model, tied=False)
    # the file really was permuted: reading it raw differs from HF's layout
    assert not torch.equal(f.tensor("blk.0.attn_q.weight"), model.model.layers[0].self_attn.q_proj.weight)
    _assert_same_logits(config, state, model)


def test_llama_tied_embeddings_and_quantized_weights(tmp_path):
    model = _tiny_llama(tie=True)
    quant = {"blk.0.ffn_up.weight": Q.Q8_0, "blk.1.attn_q.weight": Q.Q4_0}
    path = _convert(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "l.gguf", _llama_kv("llama", model.config),
                    tied=True, quant=quant)
    f = read_gguf(path)
    config = gguf_to_hf_config(f)
    assert config["tie_word_embeddings"] is True
    state = load_gguf_state_dict(f, config, dtype=torch.bfloat16)
    assert "lm_head.weight" not in state
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    up = model.model.layers[0].mlp.up_proj.weight.detach()
    q8 = torch.from_numpy(gq.dequantize(gq.quantize(up.numpy(), Q.Q8_0), Q.Q8_0))
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], q8.to(torch.bfloat16))
    q_ref = model.model.layers[1].self_attn.q_proj.weight.detach()
    assert (state["model.layers.1.self_attn.q_proj.weight"].float() - q_ref).abs().max() < 0.1  # unpermuted Q4_0


def _llama3_rope_factors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf writes it for rope_scaling
    {rope_type: llama3, factor, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192}."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192 / 1:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    model = _tiny_llama()  # head_dim 16, theta 10000: fast, blended and slow frequencies all occur
    factors = _llama3_rope_factors(16, 10000.0, 32.0)
    assert factors.min() == 1 and factors.max() == 32 and ((factors > 1) & (factors < 32)).any()
    kv = _llama_kv("llama", model.config)
    good = read_gguf(_convert(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "good.gguf", kv, tied=False,
                              extra={"rope_freqs.weight": (factors, None)}))
    config = gguf_to_hf_config(good)
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in load_gguf_state_dict(good, config)  # it lives on in the config
    bad = read_gguf(_convert(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "bad.gguf", kv, tied=False,
                             extra={"rope_freqs.weight": (factors[::-1].copy(), None)}))
    with pytest.raises(GGUFError, match="does not match llama3 rope scaling"):
        gguf_to_hf_config(bad)


def test_qwen2_keeps_qkv_bias_and_is_not_unpermuted(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    for layer in model.model.layers:  # random biases, so a missing one would show
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            torch.nn.init.normal_(proj.bias)
    f = read_gguf(_convert(model, gguf.MODEL_ARCH.QWEN2, tmp_path / "q.gguf", _llama_kv("qwen2", cfg), tied=True))
    config = gguf_to_hf_config(f)
    assert config["model_type"] == "qwen2" and config["rope_theta"] == 1e6
    state = load_gguf_state_dict(f, config)
    _assert_same_state(state, model, tied=True)
    _assert_same_logits(config, state, model)


def test_gemma3_norms_minus_one_and_layer_types(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                        max_position_embeddings=256, sliding_window=4, rms_norm_eps=1e-6,
                                        query_pre_attn_scalar=32)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    for name, p in model.named_parameters():  # HF inits norms to 0; make them distinct
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(p, std=0.1)
    V = gguf.GGUFValueType
    kv = {
        "gemma3.context_length": (256, V.UINT32), "gemma3.embedding_length": (64, V.UINT32),
        "gemma3.block_count": (7, V.UINT32), "gemma3.feed_forward_length": (128, V.UINT32),
        "gemma3.attention.head_count": (4, V.UINT32), "gemma3.attention.head_count_kv": (1, V.UINT32),
        "gemma3.attention.layer_norm_rms_epsilon": (1e-6, V.FLOAT32), "gemma3.attention.key_length": (32, V.UINT32),
        "gemma3.attention.value_length": (32, V.UINT32), "gemma3.rope.freq_base": (1e6, V.FLOAT32),
        "gemma3.attention.sliding_window": (4, V.UINT32),
    }
    f = read_gguf(_convert(model, gguf.MODEL_ARCH.GEMMA3, tmp_path / "g.gguf", kv, tied=True))
    config = gguf_to_hf_config(f)
    assert config["model_type"] == "gemma3_text"
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert config["layer_types"] == model.config.layer_types
    assert config["query_pre_attn_scalar"] == 32 and config["head_dim"] == 32
    assert config["sliding_window"] == 4 and config["rope_local_base_freq"] == 10000.0
    assert config["hidden_activation"] == "gelu_pytorch_tanh" and config["rms_norm_eps"] == 1e-6
    state = load_gguf_state_dict(f, config)
    _assert_same_state(state, model, tied=True, norm_atol=2 ** -23)  # one float32 ulp at 1.0
    assert torch.equal(f.tensor("blk.0.attn_q_norm.weight") - 1, state["model.layers.0.self_attn.q_norm.weight"])
    _assert_same_logits(config, state, model)


def test_gpt2_conv1d_weights_come_back_in_hf_layout(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    V = gguf.GGUFValueType
    kv = {
        "gpt2.context_length": (64, V.UINT32), "gpt2.embedding_length": (64, V.UINT32),
        "gpt2.block_count": (2, V.UINT32), "gpt2.feed_forward_length": (256, V.UINT32),
        "gpt2.attention.head_count": (4, V.UINT32), "gpt2.attention.layer_norm_epsilon": (1e-5, V.FLOAT32),
    }
    # llama.cpp's GPT-2 converter writes the tied output layer out as output.weight
    f = read_gguf(_convert(model, gguf.MODEL_ARCH.GPT2, tmp_path / "g.gguf", kv, tied=False))
    config = gguf_to_hf_config(f)
    assert config["model_type"] == "gpt2"
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["n_positions"], config["n_inner"]) == \
        (64, 2, 4, 64, 256)
    state = load_gguf_state_dict(f, config)
    _assert_same_state(state, model, tied=False)
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: (in, out)
    _assert_same_logits(config, state, model)


def test_unknown_architecture_is_named(tmp_path):
    f = read_gguf(_write_gguf(tmp_path / "m.gguf", "mamba", {}, {}))
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'.*gemma3, gpt2, llama, qwen2"):
        gguf_to_hf_config(f)


def test_missing_and_unexpected_tensors_are_all_reported(tmp_path):
    model = _tiny_llama()
    kv = _llama_kv("llama", model.config)
    path = _convert(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "l.gguf", kv, tied=False,
                    extra={"blk.7.ffn_up.weight": (np.ones((4, 32), np.float32), None)})
    f = read_gguf(path)
    config = gguf_to_hf_config(f)
    del f.tensors["blk.1.ffn_gate.weight"], f.tensors["output_norm.weight"]
    with pytest.raises(GGUFError) as info:
        load_gguf_state_dict(f, config)
    message = str(info.value)
    assert "missing tensors: blk.1.ffn_gate.weight, output_norm.weight" in message
    assert "unexpected tensors: blk.7.ffn_up.weight" in message


def test_missing_required_metadata_is_named(tmp_path):
    model = _tiny_llama()
    kv = _llama_kv("llama", model.config)
    del kv["llama.block_count"]
    f = read_gguf(_convert(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "l.gguf", kv, tied=False))
    with pytest.raises(GGUFError, match="missing metadata key 'llama.block_count'"):
        gguf_to_hf_config(f)


def test_ill_typed_metadata_is_named(tmp_path):
    model = _tiny_llama()
    kv = _llama_kv("llama", model.config)
    kv["llama.attention.head_count"] = ("four", None)
    f = read_gguf(_convert(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "l.gguf", kv, tied=False))
    with pytest.raises(GGUFError, match="'llama.attention.head_count' should be int, got str 'four'"):
        gguf_to_hf_config(f)


def test_undecodable_tensor_type_fails_before_loading(tmp_path):
    model = _tiny_llama()
    kv = _llama_kv("llama", model.config)
    f = read_gguf(_convert(model, gguf.MODEL_ARCH.LLAMA, tmp_path / "l.gguf", kv, tied=False))
    info = f.tensors["blk.0.ffn_up.weight"]
    info.ggml_type = int(Q.IQ4_NL)  # pretend; the check must fire before any data is read
    with pytest.raises(GGUFError, match=r"cannot dequantize: blk\.0\.ffn_up\.weight \(IQ4_NL\)"):
        load_gguf_state_dict(f, gguf_to_hf_config(f))


# ---------------------------------------------------------------------------
# real files (slow): the same config and state dict as transformers' own GGUF loader


def _transformers_gguf_tensors(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """transformers' GGUF config, and its tensors as `load_gguf_checkpoint(return_tensors=True)`
    produces them: GGUFReader + numpy dequantize + the architecture's TensorProcessor + its name map.
    (Called step by step rather than through from_pretrained, which would need accelerate.)"""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    reader = gguf.GGUFReader(path)  # slow on big vocabularies: build it once, lend it to transformers
    real_reader, gguf.GGUFReader = gguf.GGUFReader, lambda *args, **kwargs: reader
    try:
        hf_config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    finally:
        gguf.GGUFReader = real_reader
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_config))
    arch = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=hf_config)
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    tensors = {}
    for t in reader.tensors:
        result = processor.process(weights=gq.dequantize(t.data, t.tensor_type), name=t.name,
                                   tensor_key_mapping=name_map, parsed_parameters={"tensors": {}})
        if result.name in name_map:
            tensors[name_map[result.name]] = torch.from_numpy(np.copy(result.weights))
    return hf_config, tensors


def _assert_matches_transformers(path) -> dict:
    f = read_gguf(path)
    config = gguf_to_hf_config(f)
    state = load_gguf_state_dict(f, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_config, ref = _transformers_gguf_tensors(path)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == hf_config[key], key
    assert config["rms_norm_eps"] == pytest.approx(hf_config["rms_norm_eps"], rel=1e-6)
    assert set(state) == set(ref)
    for name, t in state.items():
        assert torch.equal(t, ref[name]), name
    return config


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_gguf_path):
    config = _assert_matches_transformers(smollm2_gguf_path)  # Q4_1, Q8_0, F32; llama Q/K unpermuted
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0


@pytest.mark.slow
def test_gemma3_gguf_matches_transformers(gemma3_gguf_path):
    config = _assert_matches_transformers(gemma3_gguf_path)  # Q5_0, Q4_K, Q6_K, Q8_0, F32; norms - 1
    # what google/gemma-3-270m's config.json says
    assert config["query_pre_attn_scalar"] == 256 and config["sliding_window"] == 512
    assert config["rope_theta"] == 1e6 and config["rope_local_base_freq"] == 10000.0
    assert config["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
