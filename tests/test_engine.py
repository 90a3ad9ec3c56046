"""The continuous-batching engine: requests join and leave at every step, and a request's tokens
(and log-probabilities, to the bit) do not depend on what else is in the batch."""

from __future__ import annotations

import json
import threading

import pytest
import torch

import tokenloom
from tests.test_seq2seq import VOCAB, tiny_t5
from tests.tiny import save_tiny, train_tokenizer
from tokenloom.engine.beam import beam_search
from tokenloom.engine.engine import Engine
from tokenloom.engine.serving import EngineService, QueueFullError
from tokenloom.errors import TokenloomError
from tokenloom.models.base import rows_independent

PROMPTS = ["Once upon a time", "The quick brown fox jumps over the lazy dog", "def add(a, b):", "A",
           "The fox and the dog", "Once", "The quick brown fox", "dog dog dog", "a b c d e f g h",
           "Once upon a time there was a fox", "The lazy dog", "fox", "quick quick", "brown", "time",
           "over the", "jumps over the lazy fox and the quick dog"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    save_tiny("llama", root / "llama")
    return tokenloom.load(root / "llama")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_t5")
    tiny_t5().save_pretrained(root)
    train_tokenizer(VOCAB).save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))
    return tokenloom.load(root)


class Collector:
    """Runs requests on one engine and keeps what each one emitted."""

    def __init__(self, model, **engine_kwargs):
        self.model = model
        self.engine = Engine(model.network, model.dtype, model.device, **engine_kwargs)
        self.deltas: dict[int, list] = {}

    def add(self, prompt: str, **params):
        rid = len(self.deltas)
        self.deltas[rid] = []
        cfg = self.model.generation_config(**params)
        ids = self.model.encode_prompts([prompt])[0]
        req = self.model.make_request(ids, cfg, self.deltas[rid].append, rid=rid)
        self.engine.add(req)
        return req

    def run(self, steps: int | None = None):
        n = 0
        while self.engine.has_work and (steps is None or n < steps):
            self.engine.step()
            n += 1

    def tokens(self, rid: int, index: int = 0) -> list[int]:
        return [t for d in self.deltas[rid] if d.index == index for t in d.token_ids]

    def logprobs(self, rid: int) -> list[float]:
        return [lp.logprob for d in self.deltas[rid] for lp in (d.logprobs or [])]


def alone(model, prompt, **params):
    c = Collector(model)
    c.add(prompt, **params)
    c.run()
    return c.tokens(0), c.logprobs(0)


@pytest.mark.parametrize("params", [dict(), dict(do_sample=True, temperature=1.3, top_k=50, seed=11),
                                    dict(do_sample=True, top_p=0.9, repetition_penalty=1.2, seed=5)])
def test_a_request_among_16_others_gives_the_same_tokens_and_logprobs_as_alone(llama, params):
    params = dict(max_new_tokens=12, logprobs=1, ignore_eos=True, **params)
    ref_tokens, ref_lps = alone(llama, PROMPTS[0], **params)
    c = Collector(llama)
    for i, p in enumerate(PROMPTS[1:9]):  # neighbours with other prompts, lengths and settings
        c.add(p, max_new_tokens=5 + i, do_sample=i % 2 == 1, seed=i, ignore_eos=True)
    c.run(steps=3)  # the batch is running when the request joins
    req = c.add(PROMPTS[0], **params)
    for i, p in enumerate(PROMPTS[9:]):
        c.add(p, max_new_tokens=20, do_sample=True, seed=100 + i, ignore_eos=True)
    c.run()
    rid = req.id
    assert c.tokens(rid) == ref_tokens
    assert c.logprobs(rid) == ref_lps  # bit for bit: the batch shape does not reach a row's numbers


def test_the_same_holds_on_the_real_default_model(smollm2_gguf_path):
    model = tokenloom.load(smollm2_gguf_path, progress=False)
    params = dict(max_new_tokens=8, logprobs=1, do_sample=True, seed=3, ignore_eos=True)
    ref_tokens, ref_lps = alone(model, "The capital of France is", **params)
    c = Collector(model)
    for i, p in enumerate(PROMPTS[:16]):
        c.add(p, max_new_tokens=4 + i % 5, do_sample=True, seed=i, ignore_eos=True)
    c.run(steps=2)
    req = c.add("The capital of France is", **params)
    c.run()
    assert c.tokens(req.id) == ref_tokens
    assert c.logprobs(req.id) == ref_lps


def test_long_prompts_are_prefilled_in_chunks_while_others_stream(llama):
    c = Collector(llama, prefill_chunk=8)
    first = c.add(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
    c.run(steps=2)
    long_prompt = " ".join(PROMPTS[:7])  # many chunks of 8
    n_long = len(llama.encode_prompts([long_prompt])[0])
    assert 30 <= n_long <= 100
    late = c.add(long_prompt, max_new_tokens=4, ignore_eos=True)
    before = len(c.tokens(first.id))
    steps = 0
    while not c.deltas[late.id]:
        c.engine.step()
        steps += 1
    assert steps >= n_long // 8  # the prompt took one chunk per step ...
    assert len(c.tokens(first.id)) - before >= steps - 1  # ... and the running request got a token every step
    c.run()
    assert c.tokens(late.id) == alone(llama, long_prompt, max_new_tokens=4, ignore_eos=True)[0]


def test_requests_that_arrive_together_start_together_within_the_prompt_budget(llama):
    c = Collector(llama, prefill_chunk=32)
    sizes = [len(llama.encode_prompts([p])[0]) for p in PROMPTS[:8]]
    assert max(sizes) <= 32  # each prompt is one chunk
    reqs = [c.add(p, max_new_tokens=4, ignore_eos=True) for p in PROMPTS[:8]]
    c.engine.step()
    started = [bool(c.deltas[r.id]) for r in reqs]
    # requests are read in order until 32 prompt tokens were read: the one crossing it is the last
    n = next(i + 1 for i in range(8) if sum(sizes[:i + 1]) >= 32)
    assert 1 < n < 8 and started == [True] * n + [False] * (8 - n)
    assert c.engine.live_rows == n and len(c.engine.waiting) == 8 - n
    c.run()
    for p, r in zip(PROMPTS, reqs):
        assert c.tokens(r.id) == alone(llama, p, max_new_tokens=4, ignore_eos=True)[0]


def test_abort_frees_the_rows_at_once_and_an_idle_engine_releases_its_cache(llama):
    c = Collector(llama)
    a = c.add(PROMPTS[0], max_new_tokens=50, ignore_eos=True, num_return_sequences=3, do_sample=True, seed=1)
    b = c.add(PROMPTS[1], max_new_tokens=50, ignore_eos=True)
    c.run(steps=4)
    assert c.engine.live_rows == 4
    c.engine.abort(a)
    assert c.engine.live_rows == 1 and a.rows == [] and b.rows == [0]
    assert [d.finish_reason for d in c.deltas[a.id] if d.finish_reason] == ["abort"] * 3
    c.run(steps=3)  # b carries on
    assert len(c.tokens(b.id)) == 7  # admitted with a at step 1: a token in each of steps 1-7
    c.engine.abort(b)
    c.engine.step()
    assert not c.engine.has_work and c.engine.cache.nbytes == 0


def test_n_sequences_and_beam_search_run_inside_the_engine(llama):
    ref = beam_search(llama.network, [llama.encode_prompts([PROMPTS[0]])[0]],
                      llama.generation_config(num_beams=3, num_return_sequences=2, max_new_tokens=8),
                      llama.tokenizer.eos_token_ids)[0]
    c = Collector(llama)
    c.add(PROMPTS[2], max_new_tokens=20, do_sample=True, seed=4, num_return_sequences=3)
    beam = c.add(PROMPTS[0], num_beams=3, num_return_sequences=2, max_new_tokens=8)
    c.add(PROMPTS[1], max_new_tokens=20)
    c.run()
    got = sorted((d.index, d.token_ids, d.score) for d in c.deltas[beam.id])
    assert [g[1] for g in got] == [h.token_ids for h in ref]
    assert [g[2] for g in got] == pytest.approx([h.score for h in ref], abs=1e-5)
    seqs = [c.tokens(0, j) for j in range(3)]
    assert len({tuple(s) for s in seqs}) == 3  # three different samples of one prompt


def test_encoder_decoder_requests_batch_like_the_others(t5):
    params = dict(max_new_tokens=8, logprobs=1, min_new_tokens=8)
    src = "translate English to German: The quick brown fox."
    ref_tokens, ref_lps = alone(t5, src, **params)
    c = Collector(t5)
    for i, p in enumerate(PROMPTS[:6]):
        c.add(p, max_new_tokens=3 + i, do_sample=True, seed=i)
    c.run(steps=2)
    req = c.add(src, **params)
    c.add(PROMPTS[7], num_beams=2, max_new_tokens=5)
    c.run()
    assert c.tokens(req.id) == ref_tokens and c.logprobs(req.id) == ref_lps


def test_nan_logits_fail_one_request_and_the_others_carry_on(llama, monkeypatch):
    c = Collector(llama)
    good = c.add(PROMPTS[1], max_new_tokens=10, ignore_eos=True)
    bad = c.add(PROMPTS[2], max_new_tokens=10, ignore_eos=True)
    c.run(steps=3)
    real_forward = llama.network.forward

    def poisoned(ids, *args, **kwargs):  # the network's own output is NaN in bad's rows
        out = real_forward(ids, *args, **kwargs)
        if ids.shape[1] == 1 and bad.rows:
            out[bad.rows] = float("nan")
        return out

    monkeypatch.setattr(llama.network, "forward", poisoned)
    c.run()
    monkeypatch.undo()
    assert bad.error and "NaN" in bad.error
    assert c.deltas[bad.id][-1].finish_reason == "error"
    assert len(c.tokens(good.id)) == 10
    assert c.tokens(good.id) == alone(llama, PROMPTS[1], max_new_tokens=10, ignore_eos=True)[0]


def test_service_serves_threads_concurrently_and_refuses_when_the_queue_is_full(llama):
    service = EngineService(llama, max_batch=4, max_queue=64)
    try:
        ids = [llama.encode_prompts([p])[0] for p in PROMPTS[:8]]
        cfg = llama.generation_config(max_new_tokens=6, ignore_eos=True)
        results: dict[int, list[int]] = {}

        def client(i):
            results[i] = [t for d in service.submit(ids[i], cfg) for t in d.token_ids]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for i, p in enumerate(PROMPTS[:8]):
            assert results[i] == alone(llama, p, max_new_tokens=6, ignore_eos=True)[0]
        assert service.running == 0 and service.health()["status"] == "ok"
    finally:
        service.shutdown()
    small = EngineService(llama, max_batch=1, max_queue=1)
    try:
        long = llama.generation_config(max_new_tokens=100, ignore_eos=True)
        streams = [small.submit(ids[0], long)]
        with pytest.raises(QueueFullError):
            for _ in range(5):  # one runs, one waits, then the queue is full
                streams.append(small.submit(ids[0], long))
        for s in streams:
            s.abort()
        for s in streams:
            list(s)
    finally:
        small.shutdown(drain=False)
    assert small.health()["loop"] == "stopped"


def test_a_failed_request_raises_for_its_reader(llama, monkeypatch):
    model_out = []
    service = EngineService(llama)
    try:
        net = type(llama.network)
        real = net.forward  # the model itself goes wrong: NaN logits from the prefill on
        monkeypatch.setattr(net, "forward", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
        stream = service.submit(llama.encode_prompts(["fox"])[0], llama.generation_config(max_new_tokens=3))
        with pytest.raises(TokenloomError, match="NaN"):
            model_out.extend(stream)
        monkeypatch.setattr(net, "forward", real)
        ok = service.submit(llama.encode_prompts(["fox"])[0], llama.generation_config(max_new_tokens=3))
        assert sum(len(d.token_ids) for d in ok) >= 1
    finally:
        service.shutdown()


def test_one_token_attention_ignores_masked_columns_at_any_multiple_of_the_block():
    """The premise of the cache's CPU_BLOCK (engine/slots.py): the width a step attends over
    depends on the longest neighbour, so it must not change a row's numbers."""
    from tokenloom.engine.slots import CPU_BLOCK
    from tokenloom.models.base import attend

    g = torch.Generator().manual_seed(0)
    for length in (5, 37, 130):
        q = torch.randn(2, 6, 1, 16, generator=g)
        k, v = torch.randn(2, 2, 600, 16, generator=g), torch.randn(2, 2, 600, 16, generator=g)
        widths = range(-(-length // CPU_BLOCK) * CPU_BLOCK, 600, CPU_BLOCK)
        outs = []
        for w in widths:
            mask = torch.zeros(2, 1, 1, w, dtype=torch.bool)
            mask[..., :length] = True
            outs.append(attend(q, k[:, :, :w], v[:, :, :w], mask, None))
        assert all(torch.equal(o, outs[0]) for o in outs)


def test_one_token_attention_gives_a_row_the_same_bits_beside_any_neighbours():
    """PyTorch's CPU SDPA kernel splits its work by batch size with 2+ threads, and a row's
    low bits then depend on the rows beside it (measured with torch 2.13); a decode step's
    attention (models/base.py `_attend_one`) must not, and must still equal SDPA's numbers."""
    import torch.nn.functional as F

    from tokenloom.models.base import attend

    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows, width in ((8, 64), (9, 128), (32, 512)):
            q = torch.randn(rows, 9, 1, 64, generator=g)
            k, v = torch.randn(rows, 3, width, 64, generator=g), torch.randn(rows, 3, width, 64, generator=g)
            mask = torch.rand(rows, 1, 1, width, generator=g) > 0.3
            batch = attend(q, k, v, mask, None)
            for r in range(rows):
                assert torch.equal(batch[r], attend(q[r:r + 1], k[r:r + 1], v[r:r + 1], mask[r:r + 1], None)[0])
            sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            torch.testing.assert_close(batch, sdpa.transpose(1, 2).reshape(rows, 1, -1), rtol=0, atol=2e-6)
    finally:
        torch.set_num_threads(threads)


def test_the_cache_allocates_what_is_needed_and_grows_in_place(llama):
    from tokenloom.engine.slots import CPU_BLOCK, SlotCache

    cache = SlotCache(llama.network, torch.float32, "cpu")
    cache.reserve(3, 20)
    # our float kernel's rows are independent of the row count; MKL's only in fours (MIN_ROWS)
    rows = 3 if rows_independent(torch.float32, "cpu") else 4
    assert (cache.rows, cache.width) == (rows, 2 * CPU_BLOCK)
    for t in cache.k + cache.v:
        t.normal_()
    before = [t.clone() for t in cache.k + cache.v]
    keys = cache.k
    cache.reserve(3, 2 * CPU_BLOCK + 1)
    assert cache.k is keys and cache.width == 3 * CPU_BLOCK and cache.rows == rows  # only the width grew
    for old, new in zip(before, cache.k + cache.v):
        assert torch.equal(new[:, :, :2 * CPU_BLOCK], old) and not new[:, :, 2 * CPU_BLOCK:].any()


def test_a_prompt_is_read_into_a_cache_made_wide_enough_for_its_first_new_tokens(llama, monkeypatch):
    """The first chunk's width and DECODE_HEADROOM columns are reserved at once: the cache is
    made once, and neither the first decode step nor the next 20 regrow it (copies cost time,
    and old and new side by side cost memory)."""
    from tokenloom.engine import slots
    from tokenloom.engine.engine import DECODE_HEADROOM

    made = []
    real = slots.SlotCache.reserve

    def reserve(self, rows, width, mem_width=0):
        before = (self.rows, self.width)
        real(self, rows, width, mem_width)
        if (self.rows, self.width) != before:
            made.append((self.rows, self.width))

    monkeypatch.setattr(slots.SlotCache, "reserve", reserve)
    c = Collector(llama)
    req = c.add(PROMPTS[1], max_new_tokens=20, ignore_eos=True)
    c.engine._read_prompts()  # the prefill alone (a step would go on to decode)
    assert len(made) == 1 and made[0][1] >= len(req.prompt) + 20
    assert req.logits is None and req.greedy is not None  # plain greedy: the choice, not (1, V) logits
    c.run()
    assert len(made) == 1 and len(c.tokens(0)) == 20
    made.clear()
    c.add(PROMPTS[1], max_new_tokens=500, ignore_eos=True)  # more than the headroom: reserved up to it
    c.run(steps=1)
    assert made and made[-1][1] >= len(req.prompt) + DECODE_HEADROOM
