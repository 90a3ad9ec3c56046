"""Packed int4 / int8 weights (models/quant.py, kernels/): the fast path must still match the
reference.

The reference for a quantized model is transformers running the *same* quantized weights
(expanded to float32): prefill products are then float32 on both sides, and decode products
differ only by the kernels' activations (int8 per block of 32 in ours, bfloat16 in PyTorch's).
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

import tokenloom
from tests.test_engine import PROMPTS, Collector, alone
from tests.tiny import make_hf_model, save_tiny
from tokenloom import kernels
from tokenloom.config import GenerationConfig
from tokenloom.errors import TokenloomError
from tokenloom.models.base import DENSE_MIN
from tokenloom.models.quant import (GROUP, Int4Linear, Int8Linear, Q4Linear, Q8Linear, W8A8Linear,
                                    int4_block, int4_groups, int8_blocks, q4_unpack, q8_rows, w8a8_supported)

needs_fbgemm = pytest.mark.skipif(not w8a8_supported(), reason="w8a8 needs FBGEMM (x86 CPUs)")


def q4_1_like(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Weights as a Q4_1 file holds them: per block of 32, fp16 scale and min, codes 0..15 with
    both ends used."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(n, k // GROUP, 1, generator=g) * 0.01 + 0.001).half().float()
    m = (-torch.rand(n, k // GROUP, 1, generator=g) * 0.1).half().float()
    return (codes * d + m).reshape(n, k)


def test_the_packed_layout_is_known_on_this_cpu():
    assert int4_block() in (32, 64)


def test_own_kernels_build_on_an_x86_cpu_with_avx2():
    """Not a skip: CI's machine has a compiler and AVX2, so the fast path must be there."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    wanted = os.environ.get("TOKENLOOM_KERNELS", "1") != "0"
    if wanted and x86 and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert kernels.library() is not None
        assert kernels.build().parent == kernels.cache_dir()
    else:  # elsewhere (or switched off) PyTorch's kernels run, by design
        assert kernels.library() is None


def test_int4_keeps_a_q4_1_grid():
    w = q4_1_like(64, 96)
    codes, scale, lo = int4_groups(w)
    back = (codes.view(64, 3, GROUP) * scale[..., None] + lo[..., None]).view(64, 96)
    torch.testing.assert_close(back, w, atol=1e-6, rtol=0)  # float32 scales: the file's values
    dense = Int4Linear(w, None).dense_t().t()  # bfloat16 scales and zeros: within their rounding
    assert (dense - w).abs().max() <= 2 ** -8 * w.abs().max()
    if kernels.library():  # Q4_1 blocks keep fp16 scales and mins: the file's own values
        torch.testing.assert_close(Q4Linear(w, None).dense_t().t(), w, atol=1e-6, rtol=0)


OWN = pytest.mark.skipif(kernels.library() is None, reason="tokenloom's kernels need x86 with AVX2 and a compiler")
ALL_PACKED = [Int4Linear, Int8Linear, pytest.param(Q4Linear, marks=OWN), pytest.param(Q8Linear, marks=OWN)]


@pytest.mark.parametrize("cls", ALL_PACKED)
def test_prefill_and_decode_products_agree_with_the_expanded_weights(cls):
    torch.manual_seed(0)
    w, b = torch.randn(128, 64) * 0.1, torch.randn(128)  # 128: a multiple of int4_block() (32 or 64)
    layer = cls(w, b)
    expanded = layer.dense_t().t()
    x = torch.randn(1, DENSE_MIN, 64)
    ref = x @ expanded.t() + b
    if cls in (Q4Linear, Q8Linear):  # our kernels run prefills too (Q4: faster than float32 GEMM)
        torch.testing.assert_close(layer(x), ref, atol=0.05, rtol=0.02)
        assert torch.equal(layer(x)[:, :1], layer(x[:, :1]))
    else:  # prefill: float32 GEMM
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    step = x[:, :1]  # decode: one position -> the packed kernel, 8-bit activations
    torch.testing.assert_close(layer(step), ref[:, :1], atol=0.05, rtol=0.02)
    assert (expanded - w).abs().max() < (0.1 if cls in (Int4Linear, Q4Linear) else 0.01)


def int8_activation_reference(x: torch.Tensor, wq: torch.Tensor, wd: torch.Tensor, wm: torch.Tensor | None):
    """What the kernels compute, in float64: rows quantized to int8 per block of 32 (round half
    to even), exact integer block sums, scaled by both blocks' scales; Q4_1 adds min * the sum
    of the row's block. The row's scale and sum are kept at fp16 precision, as GGUF's Q8_0 /
    Q8_1 blocks hold them (so that greedy tokens follow llama.cpp's more often)."""
    m, k = x.shape
    xb = x.view(m, k // GROUP, GROUP)
    amax = xb.abs().amax(-1)
    xq = (xb * torch.where(amax > 0, 127 / amax, 0)[..., None]).round()
    xd = (amax / 127).half().float()
    xs = (amax / 127 * xq.sum(-1)).half().float()
    dots = torch.einsum("mbj,nbj->mnb", xq.double(), wq.double().view(wq.shape[0], k // GROUP, GROUP))
    out = (dots * wd.double()[None] * xd.double()[:, None]).sum(-1)
    if wm is not None:
        out += (wm.double()[None] * xs.double()[:, None]).sum(-1)
    return out


@OWN
def test_own_kernels_compute_int8_activations_times_the_blocks():
    torch.manual_seed(2)
    w, x = torch.randn(72, 160), torch.randn(9, 160)
    q4 = Q4Linear(w, None)
    codes, scale, lo = q4_unpack(q4.codes, q4.scales)
    ref = int8_activation_reference(x, codes, scale.float(), lo.float())
    torch.testing.assert_close(q4(x).double(), ref, atol=1e-5, rtol=1e-5)
    q8 = Q8Linear(w, None)
    codes, scales = q8_rows(q8.codes, q8.scales, torch.arange(72))
    ref = int8_activation_reference(x, codes, scales.float(), None)
    torch.testing.assert_close(q8(x).double(), ref, atol=1e-5, rtol=1e-5)
    x[3] = 0  # an all-zero row: scale 0, no NaN
    assert torch.isfinite(q4(x)).all() and torch.isfinite(q8(x)).all()
    bad = x.clone()
    bad[5, 37] = float("nan")  # quantized, a NaN would be a finite code: its row's products are NaN
    for layer in (q4, q8):
        out = layer(bad)
        assert out[5].isnan().all() and torch.equal(out[[0, 1, 2, 3, 4, 6, 7, 8]], layer(x)[[0, 1, 2, 3, 4, 6, 7, 8]])


@OWN
def test_the_heads_argmax_equals_the_products_argmax_without_making_them():
    torch.manual_seed(3)
    w = torch.randn(200, 96)
    w[[77, 150, 199]] = w[40].clone()  # equal codes: equal products, where the first channel must win
    head = Q8Linear(w, None)
    x = torch.randn(6, 96)
    x[2] = w[40] * 3  # row 2's largest product is the four-way tie
    x[4, 10] = float("nan")
    top, best = head.argmax(x)
    out = head(x)
    assert top[2] == 40 and (out[2] == out[2].max()).sum() == 4
    ok = [0, 1, 2, 3, 5]
    assert torch.equal(top[ok], out[ok].argmax(-1)) and torch.equal(best[ok], out[ok].amax(-1))
    assert best[4].isnan() and torch.isfinite(best[ok]).all()
    biased = Q8Linear(w, torch.randn(200))  # a bias: the products are made, same answers
    out = biased(x)
    assert torch.equal(biased.argmax(x)[0][ok], out[ok].argmax(-1))


def test_kernels_use_vnni_where_the_cpu_has_it_unless_told_avx2(monkeypatch):
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    has = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(flags)
    monkeypatch.delenv("TOKENLOOM_KERNELS", raising=False)
    assert kernels.cpu_isa() == ("avx512vnni" if has else "avx2")
    monkeypatch.setenv("TOKENLOOM_KERNELS", "avx2")
    assert kernels.cpu_isa() == "avx2"


@OWN
@pytest.mark.skipif(kernels.cpu_isa() != "avx512vnni", reason="the VNNI build runs only on a CPU with AVX-512 VNNI")
def test_the_vnni_build_gives_the_avx2_builds_numbers_bit_for_bit():
    """Both builds' integer block sums are exact and their float steps the same, in the same
    order: from one row (plain) through pairs of rows, odd counts and several row tiles."""
    torch.manual_seed(4)
    avx2, vnni = (kernels.load(kernels.build(isa=isa)) for isa in ("avx2", "avx512vnni"))
    w = torch.randn(200, 96)
    q4, q8 = Q4Linear(w, None), Q8Linear(w, None)
    q8.codes.view(-1)[::37] = -128  # a GGUF file may hold Q8_0's -128
    bits = lambda t: t.view(torch.int32)  # NaN == NaN, bit for bit
    for m in (1, 2, 3, 4, 7, 64, 65, 130):
        x = torch.randn(m, 96) * 4
        x[0, :32] = 0  # an all-zero block
        if m > 3:
            x[3, 50] = float("nan")
        for fn, layer in (("tl_q4_gemm", q4), ("tl_q8_gemm", q8)):
            a, b = (kernels._gemm(getattr(lib, fn), x, layer.codes, layer.scales, 200) for lib in (avx2, vnni))
            assert torch.equal(bits(a), bits(b)), (fn, m)
        picks = []
        for lib in (avx2, vnni):
            idx, best = torch.empty(m, dtype=torch.long), torch.empty(m)
            lib.tl_q8_argmax(x.data_ptr(), m, 96, q8.codes.data_ptr(), q8.scales.data_ptr(), 200, idx.data_ptr(),
                             best.data_ptr(), 1)
            picks.append((idx, bits(best)))
        assert torch.equal(picks[0][0], picks[1][0]) and torch.equal(picks[0][1], picks[1][1])


def test_int8_blocks_round_with_the_stored_fp16_scale():
    w = torch.randn(40, 64)
    codes, scales = int8_blocks(w, rows=16)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (40, 2)
    back = codes.float().view(40, 2, GROUP) * scales.float()[..., None]
    assert ((back.view(40, 64) - w).abs() <= scales.float().repeat_interleave(GROUP, 1) * 0.5 + 1e-6).all()


@needs_fbgemm
def test_w8a8_products_carry_about_13_bits_of_activation():
    """Activations are sent as their 7-bit rounding plus the rounding error, so the product is
    that of the (8-bit) weights with the float32 input to within ~2^-13 of each row's range;
    one 8-bit pass would be off by ~2^-8."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 64) * 0.1, torch.randn(96)
    layer = W8A8Linear(w, b)
    expanded = layer.dense_t().t()
    assert (expanded - w).abs().max() <= w.abs().amax(1).max() / 254 + 1e-6  # 8-bit per channel
    x = torch.randn(2, 70, 64)
    x[0, 3] *= 50  # an outlier row: it has its own scale
    ref = x @ expanded.t()
    err = (layer(x) - b - ref).abs() / (x.abs().amax(-1, keepdim=True) * expanded.abs().sum(1))
    assert err.max() < 2 ** -13
    assert torch.equal(layer(torch.zeros(1, 1, 64)), b.view(1, 1, 96))  # an all-zero row stays finite


@pytest.mark.parametrize("cls", [*ALL_PACKED, pytest.param(W8A8Linear, marks=needs_fbgemm)])
def test_a_rows_result_does_not_depend_on_the_batch(cls):
    torch.manual_seed(1)
    layer = cls(torch.randn(128, 64), None)
    x = torch.randn(33, 1, 64)
    full = layer(x)
    for m in (1, 2, 3, 5, 8, 17):  # rows in tiles of 4 and alone (the kernels' two paths)
        assert torch.equal(layer(x[:m]), full[:m])
        assert torch.equal(layer(x[m:m + 1]), full[m:m + 1])
    if cls is W8A8Linear:  # one integer kernel for every shape: prefill rows equal decode rows
        x = torch.randn(3, 70, 64)
        full = layer(x)
        assert torch.equal(layer(x[1:2]), full[1:2])
        assert torch.equal(layer(x[:, 5:6]), full[:, 5:6])


def expanded(m) -> torch.Tensor:
    if hasattr(m, "dense_t"):
        return m.dense_t().t()
    return m(torch.arange(m.num_embeddings))  # an embedding: every row of the table


@pytest.fixture(scope="module", params=[pytest.param("int4", marks=OWN), "int4-torch",
                                        pytest.param("w8a8", marks=needs_fbgemm)])
def pair(tmp_path_factory, request):
    """A tiny Llama quantized three ways: int4 in our kernels, int4 in PyTorch's (where ours do
    not build), and w8a8."""
    folder = tmp_path_factory.mktemp("quant") / "llama"
    save_tiny("llama", folder)
    mode, _, impl = request.param.partition("-")
    with pytest.MonkeyPatch.context() as mp:
        if impl == "torch":
            mp.setattr(kernels, "library", lambda: None)
        ours = tokenloom.load(folder, quantize=mode)
    hf = make_hf_model("llama")
    with torch.no_grad():  # transformers gets our quantized weights, expanded to float32
        for i, layer in enumerate(ours.network.layers):
            a, m, h = layer.self_attn, layer.mlp, hf.model.layers[i]
            q, k, v = a.qkv_proj.dense_t().t().split([a.n_heads * a.hd, a.n_kv * a.hd, a.n_kv * a.hd])
            h.self_attn.q_proj.weight.copy_(q), h.self_attn.k_proj.weight.copy_(k), h.self_attn.v_proj.weight.copy_(v)
            h.self_attn.o_proj.weight.copy_(a.o_proj.dense_t().t())
            gate, up = m.gate_up_proj.dense_t().t().chunk(2)
            h.mlp.gate_proj.weight.copy_(gate), h.mlp.up_proj.weight.copy_(up)
            h.mlp.down_proj.weight.copy_(m.down_proj.dense_t().t())
        for src, dst in ((ours.network.lm_head, hf.lm_head), (ours.network.embed_tokens, hf.model.embed_tokens)):
            dst.weight.copy_(expanded(src))
    return ours, hf


def test_every_product_and_table_is_packed(pair):
    ours, _ = pair
    kinds = {type(m).__name__ for m in ours.network.modules()}
    assert not {"Linear", "Embedding"} & kinds
    if ours.quantization == "int4" and isinstance(ours.network.lm_head, Q8Linear):
        # an untied table stays int8 per row (Int8Embedding): a tied one shares the head's blocks
        assert {"Q4Linear", "Q8Linear", "Int8Embedding"} == kinds & {"Q4Linear", "Q8Linear", "Int4Linear", "Int8Linear",
                                                                    "Int8Embedding"}
    elif ours.quantization == "int4":
        assert {"Int4Linear", "Int8Linear", "Int8Embedding"} <= kinds
        assert isinstance(ours.network.lm_head, Int8Linear)
    else:
        assert {"W8A8Linear", "Int8Embedding"} == kinds & {"W8A8Linear", "Int8Embedding", "Int4Linear", "Int8Linear"}


def test_an_embedding_tied_to_the_head_shares_its_codes(tmp_path, monkeypatch):
    save_tiny("gpt2", tmp_path)  # GPT-2 ties its head to the token table
    net = tokenloom.load(tmp_path, quantize="int8").network
    if kernels.library():
        assert net.wte.codes is net.lm_head.codes and net.wte.scales is net.lm_head.scales
        torch.testing.assert_close(net.wte(torch.tensor([[3, 5]]))[0], net.lm_head.dense_t().t()[[3, 5]])
    monkeypatch.setattr(kernels, "library", lambda: None)
    net = tokenloom.load(tmp_path, quantize="int8").network
    assert net.wte.weight_int8 is net.lm_head.weight_int8


def test_prefill_logits_equal_transformers_on_the_same_weights(pair):
    """int4 in PyTorch's kernels: float32 GEMM on both sides. w8a8: ~13-bit activations. int4 in
    ours: 8-bit activations per block of 32, as in decode steps."""
    ours, hf = pair
    ids = torch.tensor([list(range(3, 3 + DENSE_MIN))])
    with torch.inference_mode():
        ref = hf(ids).logits
        got = ours.network(ids, torch.arange(ids.shape[1])[None], ours.network.make_cache(1, ids.shape[1]))
    if isinstance(ours.network.layers[0].mlp.down_proj, Q4Linear):
        assert (got - ref).abs().max() < 0.02 * ref.abs().max()
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
        return
    tol = 1e-4 if ours.quantization == "int4" else 2e-4
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_decode_steps_follow_transformers_on_its_greedy_path(pair):
    """Teacher-forced along transformers' greedy sequence, one token per step (the packed
    kernels, bfloat16 activations): logits stay within bfloat16 rounding and pick the same
    tokens where transformers' choice is clear."""
    ours, hf = pair
    prompt = ours.encode_prompts([PROMPTS[1]])[0]
    with torch.inference_mode():
        seq = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        ref = hf(seq).logits[0, len(prompt) - 1:-1]
        net, cache = ours.network, ours.network.make_cache(1, seq.shape[1])
        net(seq[:, :len(prompt) - 1], torch.arange(len(prompt) - 1)[None], cache)
        got = torch.cat([net(seq[:, t:t + 1], torch.tensor([[t]]), cache)[0]
                         for t in range(len(prompt) - 1, seq.shape[1] - 1)])
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    top2 = ref.topk(2).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.02 * ref.abs().max()
    assert clear.sum() >= 8 and torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def count_argmax_calls(monkeypatch) -> list[int]:
    """The row counts of every Q8Linear.argmax call from now on (the calls still run)."""
    calls = []
    real = Q8Linear.argmax
    monkeypatch.setattr(Q8Linear, "argmax", lambda self, x: calls.append(len(x)) or real(self, x))
    return calls


def greedy_alone_from_logits(model, prompts: list[str], **params) -> list[list[int]]:
    """Each prompt's tokens, alone on an engine that never asks the head for its argmax."""
    out = []
    for p in prompts:
        c = Collector(model)
        c.engine.argmax_head = None
        c.add(p, **params)
        c.run()
        out.append(c.tokens(0))
    return out


@OWN
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_greedy_steps_take_the_heads_argmax_in_every_decoder_family(arch, tmp_path, monkeypatch):
    save_tiny(arch, tmp_path)
    ours = tokenloom.load(tmp_path, quantize="int4")
    assert isinstance(ours.network.lm_head, Q8Linear)
    greedy = dict(max_new_tokens=8, ignore_eos=True)
    want = greedy_alone_from_logits(ours, PROMPTS[:4], **greedy)
    calls = count_argmax_calls(monkeypatch)
    c = Collector(ours)
    for p in PROMPTS[:4]:
        c.add(p, **greedy)
    c.run()
    assert [c.tokens(i) for i in range(4)] == want
    assert 4 in calls  # steps of all four rows asked the head for its argmax only
    if arch == "gemma3_text":  # soft-capped logits could tie where the raw ones do not
        ours.network.args.final_logit_softcapping = 30.0
        assert Collector(ours).engine.argmax_head is None


@OWN
def test_a_sampled_request_or_a_nan_takes_a_greedy_step_back_to_logits(tmp_path, monkeypatch):
    save_tiny("llama", tmp_path)
    ours = tokenloom.load(tmp_path, quantize="int4")
    greedy = dict(max_new_tokens=8, ignore_eos=True)
    want = greedy_alone_from_logits(ours, PROMPTS[:3], **greedy)
    calls = count_argmax_calls(monkeypatch)
    # a sampled request in the batch: its steps make logits, the greedy one still gets its tokens
    c = Collector(ours)
    c.add(PROMPTS[0], **greedy)
    c.add(PROMPTS[1], do_sample=True, seed=3, **greedy)
    c.run(steps=4)
    assert calls == []
    c.run()
    assert c.tokens(0) == want[0]
    # NaN in one request's hidden state: the step falls back to logits and fails that request only
    c = Collector(ours)
    good, bad = c.add(PROMPTS[2], **greedy), c.add(PROMPTS[1], **greedy)
    c.run(steps=3)
    forward = ours.network.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if not kwargs.get("head", True) and bad.rows:
            out[bad.rows] = float("nan")
        return out

    monkeypatch.setattr(ours.network, "forward", poisoned)
    c.run()
    assert calls and bad.error and "NaN" in bad.error and c.tokens(good.id) == want[2]


@pytest.mark.parametrize("neighbours", [1, 2, 9])
def test_packed_requests_are_batch_invariant_without_row_padding(pair, neighbours):
    ours, _ = pair
    params = dict(max_new_tokens=10, logprobs=1, do_sample=True, seed=7, ignore_eos=True)
    ref_tokens, ref_lps = alone(ours, PROMPTS[0], **params)
    c = Collector(ours)
    assert c.engine.cache.min_rows == 1  # decode steps run the live rows only
    for i, p in enumerate(PROMPTS[1:1 + neighbours]):
        c.add(p, max_new_tokens=4 + i, ignore_eos=True)
    c.run(steps=2)
    req = c.add(PROMPTS[0], **params)
    c.run()
    assert c.tokens(req.id) == ref_tokens and c.logprobs(req.id) == ref_lps


def test_bad_quantize_settings_are_refused_by_name(tmp_path):
    with pytest.raises(TokenloomError, match="quantize 'int3'.*allowed: auto, none, int8, int4, w8a8"):
        tokenloom.load(tmp_path, quantize="int3")
    with pytest.raises(TokenloomError, match="quantize 'int4' runs on the CPU with dtype float32.*bfloat16"):
        tokenloom.load(tmp_path, quantize="int4", dtype="bfloat16")


def test_w8a8_without_fbgemm_is_refused_by_name(tmp_path, monkeypatch):
    from tokenloom.models import quant

    save_tiny("llama", tmp_path)
    monkeypatch.setattr(quant, "w8a8_supported", lambda: False)  # an ARM CPU, say
    with pytest.raises(TokenloomError, match="quantize 'w8a8' needs PyTorch's FBGEMM.*use 'int8' or 'int4'"):
        tokenloom.load(tmp_path, quantize="w8a8")
    assert tokenloom.load(tmp_path, quantize="int4").quantization == "int4"  # the rest keeps working


@pytest.mark.slow
def test_the_default_gguf_runs_packed_and_matches_the_float_path(smollm2_gguf_path):
    from tokenloom.loading.gguf import quantization_mode, read_gguf

    assert quantization_mode(read_gguf(smollm2_gguf_path)) == "int4"
    fast = tokenloom.load(smollm2_gguf_path, progress=False)
    ref = tokenloom.load(smollm2_gguf_path, quantize="none", progress=False)
    assert fast.quantization == "int4" and ref.quantization is None
    text = " runs through the old town, past the mill and under the stone bridge, down to the sea."
    nll = {name: -m.score("The river", text).total for name, m in (("fast", fast), ("ref", ref))}
    assert abs(nll["fast"] / nll["ref"] - 1) < 0.02
    # greedy tokens, teacher-forced along the float path's own greedy text: wherever its choice
    # is clear (top-2 logits 1.0 apart), the packed paths choose the same. Free-running texts
    # part at near-ties ("Once upon a time, the city of" + "Nova" for llama.cpp and the float
    # path, "New" for the packed one), after which anything may follow.
    ids = ref.generate_ids([ref.encode_prompts(["Once upon a time"])[0]],
                           GenerationConfig.from_dict({"max_new_tokens": 32, "temperature": 0, "ignore_eos": True}))
    seq = torch.tensor([ref.encode_prompts(["Once upon a time"])[0] + ids[0].token_ids])
    want = full_logits(ref, seq)
    top2 = want.topk(2).values
    clear = top2[:, 0] - top2[:, 1] > 1.0
    assert clear.sum() >= 16
    assert torch.equal(full_logits(fast, seq).argmax(-1)[clear], want.argmax(-1)[clear])
    if w8a8_supported():  # benchmarks/perplexity.py: -0.06% on a 758-token text
        del fast
        w8a8 = tokenloom.load(smollm2_gguf_path, quantize="w8a8", progress=False)
        assert abs(-w8a8.score("The river", text).total / nll["ref"] - 1) < 0.02
        assert torch.equal(full_logits(w8a8, seq).argmax(-1)[clear], want.argmax(-1)[clear])


def full_logits(model, seq: torch.Tensor) -> torch.Tensor:
    """(T, V) logits of every position of one sequence (1, T), in one forward."""
    with torch.inference_mode():
        net = model.network
        return net(seq, torch.arange(seq.shape[1])[None], net.make_cache(1, seq.shape[1]))[0]


def test_int8_rows_in_chunks_equals_all_at_once():
    from tokenloom.models.quant import int8_rows

    w = torch.randn(1000, 64)
    codes, scale = int8_rows(w, rows=96)
    ref_scale = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(codes, (w / ref_scale[:, None]).round().clamp(-127, 127).to(torch.int8))


def test_a_consuming_build_empties_the_state_dict_and_builds_the_same_model(tmp_path):
    """api.load hands its weights over, so fused projections free their parts as they go."""
    from tokenloom.loading.checkpoint import load_hf_state_dict, read_hf_config
    from tokenloom.models import build_model

    save_tiny("llama", tmp_path)
    config = read_hf_config(tmp_path)
    kept, handed = load_hf_state_dict(tmp_path), load_hf_state_dict(tmp_path)
    a, b = build_model(config, kept), build_model(config, handed, consume=True)
    assert handed == {} and len(kept) > 10
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        la = a(ids, torch.arange(3)[None], a.make_cache(1, 3))
        lb = b(ids, torch.arange(3)[None], b.make_cache(1, 3))
    assert torch.equal(la, lb)
