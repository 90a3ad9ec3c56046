"""tokenloom's own decode kernels (tokenloom/kernels): float32 products against F.linear, fused
rotary attention against the op-by-op path it replaces. The quantized products are tested in
test_quant.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenloom
from tests.tiny import save_tiny
from tokenloom import kernels
from tokenloom.models import llama
from tokenloom.models.base import DENSE_MIN, Linear, Rotary, apply_rotary, attend, linear

pytestmark = pytest.mark.skipif(kernels.library() is None, reason="tokenloom's kernels need x86 with AVX2 "
                                "and a compiler (test_quant.py asserts they build where they can)")


@torch.no_grad()
def test_float_products_give_a_row_the_same_bits_at_any_row_count():
    """MKL's sgemm does not (on AVX-512 its small-row kernel runs up to a shape-dependent row
    count), so float32 decode products run in ours (models/base.py linear); prefills stay in MKL."""
    torch.manual_seed(5)
    builds = [kernels.library()] + ([kernels.load(kernels.build(isa="avx2"))] if kernels.cpu_isa() != "avx2" else [])
    for n, k in ((200, 96), (13, 37), (384, 1536)):  # 37: a tail of the input past the vectors
        layer = Linear(k, n)
        x = torch.randn(41, 1, k)
        full = layer(x)
        assert (full - F.linear(x, layer.weight, layer.bias)).abs().max() < 1e-4 * k ** 0.5
        for m in (1, 2, 3, 4, 5, 8, 17, 40):  # whole tiles of 4 rows, partial ones, and one row
            assert torch.equal(layer(x[:m]), full[:m])
            assert torch.equal(layer(x[m:m + 1]), full[m:m + 1])
        for lib in builds[1:]:  # the AVX2 build (8 lanes, not 16; 3 channels at a time, not 4)
            def mm(rows):
                y = torch.empty(len(rows), n)
                lib.tl_f32_gemm(rows.data_ptr(), len(rows), k, layer.weight.data_ptr(), layer.bias.data_ptr(), n,
                                y.data_ptr(), 2)
                return y
            y = mm(x.view(41, k))
            assert (y - full.view(41, n)).abs().max() < 1e-4 * k ** 0.5
            assert all(torch.equal(mm(x.view(41, k)[:m].contiguous()), y[:m]) for m in (1, 3, 5, 17))
    prompt, w = torch.randn(1, DENSE_MIN, 96), torch.randn(200, 96)
    assert torch.equal(linear(prompt, w), F.linear(prompt, w))


def step_inputs(rows: int, heads: int = 9, kv: int = 3, d: int = 64, width: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, (heads + 2 * kv) * d, generator=g)
    lengths = torch.randint(0, width - 16, (rows,), generator=g)
    cos, sin = Rotary({"rope_theta": 10000.0}, d)(lengths[:, None], torch.float32)
    k_cache, v_cache = torch.randn(rows, kv, width, d, generator=g), torch.randn(rows, kv, width, d, generator=g)
    end = -(-(int(lengths.max()) + 1) // 16) * 16
    mask = torch.arange(end)[None] <= lengths[:, None]  # each row: its own past and this token
    return qkv, cos.view(rows, d), sin.view(rows, d), k_cache, v_cache, lengths, end, mask


def op_by_op(qkv, cos, sin, k_cache, v_cache, cols, end, mask, heads):
    """models/llama.py's general path: rotary, the cache write, then `attend`."""
    rows, kv, _, d = k_cache.shape
    x = qkv.view(rows, 1, heads + 2 * kv, d).transpose(1, 2)
    qk = apply_rotary(x[:, :heads + kv], cos[:, None, None], sin[:, None, None])
    ar = torch.arange(rows)
    k_cache[ar, :, cols] = qk[:, heads:, 0]
    v_cache[ar, :, cols] = x[:, heads + kv:, 0]
    return attend(qk[:, :heads], k_cache[:, :, :end], v_cache[:, :, :end], mask[:, None, None], None).view(rows, -1)


# grouped-query heads go through the kernel up to 3 at a time: groups of 3, 4 (3 + 1), 1, 2
GROUPS = [(9, 3), (8, 2), (4, 4), (8, 4)]


@pytest.mark.parametrize("heads,kv", GROUPS)
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_attention_equals_rotary_cache_write_and_attention_op_by_op(rows, heads, kv):
    qkv, cos, sin, k, v, cols, end, mask = step_inputs(rows, heads, kv)
    k2, v2 = k.clone(), v.clone()
    got = kernels.rope_attention(qkv, cos, sin, k, v, torch.arange(rows), cols, end, mask, 64 ** -0.5, heads)
    ref = op_by_op(qkv, cos, sin, k2, v2, cols, end, mask, heads)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    assert torch.equal(k, k2) and torch.equal(v, v2)  # rotary: the same products and sum, bit for bit


def test_fused_attention_gives_a_row_the_same_bits_alone_and_at_any_width():
    qkv, cos, sin, k, v, cols, end, mask = step_inputs(7, seed=1)
    batch = kernels.rope_attention(qkv, cos, sin, k.clone(), v.clone(), torch.arange(7), cols, end, mask, 0.125, 9)
    for r in range(7):
        zero = torch.zeros(1, dtype=torch.long)  # the row's cache alone: its row 0
        one = kernels.rope_attention(qkv[r:r + 1], cos[r:r + 1], sin[r:r + 1], k[r:r + 1].clone(),
                                     v[r:r + 1].clone(), zero, cols[r:r + 1], end, mask[r:r + 1], 0.125, 9)
        assert torch.equal(one[0], batch[r])
        wide = torch.zeros(1, end + 32, dtype=torch.bool)  # masked extra columns change nothing
        wide[:, :end] = mask[r]
        assert torch.equal(kernels.rope_attention(qkv[r:r + 1], cos[r:r + 1], sin[r:r + 1], k[r:r + 1].clone(),
                                                  v[r:r + 1].clone(), zero, cols[r:r + 1], end + 32, wide, 0.125,
                                                  9)[0],
                           batch[r])


@pytest.mark.parametrize("heads,kv", GROUPS)
@pytest.mark.parametrize("t,window", [(11, None), (70, None), (70, 9)])
def test_fused_attention_reads_a_prompt_chunk_causally(t, window, heads, kv):
    """One cache row, a chunk of T tokens after `start` cached ones: each token attends to the
    cache and to the chunk's tokens up to itself (all keys written before any is read), or with
    a sliding window to the last `window` of them (masked keys before allowed ones)."""
    g = torch.Generator().manual_seed(3)
    d, start = 64, 5
    width = start + t + 16
    qkv = torch.randn(t, (heads + 2 * kv) * d, generator=g)
    pos = torch.arange(start, start + t)
    cos, sin = Rotary({"rope_theta": 10000.0}, d)(pos[None], torch.float32)
    k, v = torch.randn(2, kv, width, d, generator=g), torch.randn(2, kv, width, d, generator=g)
    k2, v2 = k.clone(), v.clone()
    end = -(-(start + t) // 16) * 16
    mask = torch.arange(end)[None] <= pos[:, None]
    if window:
        mask &= torch.arange(end)[None] > pos[:, None] - window
    got = kernels.rope_attention(qkv, cos.view(t, d), sin.view(t, d), k, v, torch.ones(t, dtype=torch.long), pos,
                                 end, mask, d ** -0.5, heads)
    x = qkv.view(1, t, heads + 2 * kv, d).transpose(1, 2)
    qk = apply_rotary(x[:, :heads + kv], cos, sin)
    k2[1, :, start:start + t], v2[1, :, start:start + t] = qk[0, heads:], x[0, heads + kv:]
    ref = attend(qk[:, :heads], k2[1:, :, :end], v2[1:, :, :end], mask[None, None], None)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    assert torch.equal(k, k2) and torch.equal(v, v2)  # row 0 untouched, row 1 written


def test_a_model_decodes_the_same_with_and_without_the_fused_step(tmp_path, monkeypatch):
    save_tiny("llama", tmp_path)
    net = tokenloom.load(tmp_path, quantize="none").network
    ids = torch.tensor([[5, 9, 2, 7], [3, 3, 8, 1]])

    def decode():
        cache = net.make_cache(2, 12)
        out = [net(ids, torch.arange(4).expand(2, 4), cache, last_only=True)]
        for t in range(4, 10):
            out.append(net(out[-1].argmax(-1), torch.full((2, 1), t), cache))
        return torch.cat(out, 1), cache

    with torch.inference_mode():
        fused, cache_fused = decode()
        monkeypatch.setattr(llama, "fused_decode_ok", lambda *a: False)
        plain, cache_plain = decode()
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    for a, b in zip(cache_fused.k + cache_fused.v, cache_plain.k + cache_plain.v):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biases on q, k, v
def test_a_packed_model_decodes_the_same_with_the_whole_block_fused(tmp_path, monkeypatch, arch):
    """kernels.llama_layers (norms, products, attention, SwiGLU, residuals in one call) against
    the same int4 model run module by module, through the engine, at 1 and 3 rows."""
    save_tiny(arch, tmp_path)
    model = tokenloom.load(tmp_path, quantize="int4")
    assert all(block.fused_weights() for block in model.network.layers)
    prompts = ["the tiny model", "says something", "long enough to see"]
    params = dict(max_new_tokens=8, ignore_eos=True, logprobs=2)
    fused = [model.generate(p, **params) for p in prompts] + model.generate(prompts, **params)
    with torch.inference_mode():  # the step's logits too, not only the tokens
        ids = torch.tensor([[5, 9, 2, 7]])
        cache = model.network.make_cache(1, 8)
        model.network(ids, torch.arange(4)[None], cache)
        fused_logits = model.network(ids[:, :1], torch.tensor([[4]]), cache)
    monkeypatch.setattr(llama.Block, "fused_weights", lambda self: False)
    plain = [model.generate(p, **params) for p in prompts] + model.generate(prompts, **params)
    with torch.inference_mode():
        cache = model.network.make_cache(1, 8)
        model.network(ids, torch.arange(4)[None], cache)
        torch.testing.assert_close(fused_logits, model.network(ids[:, :1], torch.tensor([[4]]), cache),
                                   rtol=0, atol=1e-4)
    for a, b in zip(fused, plain):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):  # an activation's int8 code may round one step apart
            assert abs(x.logprob - y.logprob) < 5e-3


def test_without_a_working_compiler_the_kernels_are_off_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    with pytest.raises(RuntimeError, match="building cpu_quant.cpp failed"):
        kernels.build()
    assert list((tmp_path / "tokenloom" / "kernels").iterdir()) == []  # no half-built library left
    with caplog.at_level("WARNING"):
        assert kernels.library.__wrapped__() is None
    assert "using PyTorch's" in caplog.text
    monkeypatch.setenv("TOKENLOOM_KERNELS", "0")
    assert kernels.library.__wrapped__() is None
