"""The OpenAI-compatible server (`tokenloom serve`), tested as clients see it: a real uvicorn server
on a free loopback port, the official `openai` client, and raw HTTP (httpx) for the errors.

The models are tiny and random (tests/tiny.py), so the text is gibberish: the tests compare the
server with the Python API and with itself (stream == whole, together == alone, same seed ==
same text) rather than with particular words.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import tokenloom  # noqa: E402
from tests.tiny import VOCAB, save_tiny, train_tokenizer  # noqa: E402
from tokenloom.engine.serving import EngineService  # noqa: E402
from tokenloom.server import Server, create_app  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] | trim }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
HI = [{"role": "user", "content": "Hi"}]
PROMPT = "Once upon a time"
LONG = " ".join(["word"] * 300)  # more than the tiny model's 128-token window
EXTRA = {"ignore_eos": True}  # every sequence runs to max_tokens: lengths are known
DEVICE = os.environ.get("TOKENLOOM_TEST_DEVICE", "cpu")  # e.g. cuda, to run the server's tests on a GPU


class ServerThread:
    """create_app + uvicorn in a thread of this process, so tests can look at the service."""

    def __init__(self, model, name: str = "tiny", **service_kw):
        self.service = EngineService(model, **service_kw)
        self.app = create_app(self.service, name)
        self.server = Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def wait_for(condition, timeout: float, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()


@contextlib.contextmanager
def slow_engine(service, delay: float = 0.02):
    """Each engine step takes `delay` longer, so a request is surely still running when we act."""
    step = service.engine.step

    def slow():
        time.sleep(delay)
        step()

    service.engine.step = slow
    try:
        yield
    finally:
        del service.engine.step


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve_llama")
    save_tiny("llama", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def model(folder):
    return tokenloom.load(folder, device=DEVICE)


@pytest.fixture(scope="module")
def srv(model):
    s = ServerThread(model, max_batch=16, max_queue=64)
    yield s
    s.close()


@pytest.fixture
def client(srv):
    return srv.client


def post(srv, path: str, body=None, **kw) -> httpx.Response:
    if body is not None:
        kw["json"] = body
    return httpx.post(srv.url + path, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param and err["code"] == code, err
    return err


def sse_events(lines) -> list:
    """The JSON objects of an SSE stream, up to [DONE] (included, as the string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def still_serves(client) -> None:
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body=EXTRA)
    assert r.usage.completion_tokens == 2


# ---------------------------------------------------------------------------------- completions and chat


def test_completion_is_the_libraries_generation(client, model):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, extra_body=EXTRA)
    g = model.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert r.object == "text_completion" and r.model == "tiny" and len(r.choices) == 1
    assert r.choices[0].text == g.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (g.prompt_tokens, 8)
    assert r.usage.total_tokens == g.prompt_tokens + 8


def test_chat_is_the_libraries_chat(client, model):
    r = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=6, extra_body=EXTRA)
    g = model.chat(HI, max_new_tokens=6, ignore_eos=True)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == g.text
    assert r.usage.prompt_tokens == len(model.chat_prompt_ids(HI)) and r.usage.completion_tokens == 6


def joined_stream(chunks) -> tuple[dict, dict, object]:
    texts, reasons, usage = {}, {}, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            piece = ch.delta.content if hasattr(ch, "delta") else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
            if ch.finish_reason is not None:
                assert ch.index not in reasons, "two finishing chunks for one choice"
                reasons[ch.index] = ch.finish_reason
    return texts, reasons, usage


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("params", [{}, {"temperature": 1.0, "seed": 3}])
def test_stream_joined_is_the_whole_response(client, chat, params):
    """n=2: the streamed pieces of each choice join into its non-streamed text; usage comes last."""
    kw = dict(model="tiny", max_tokens=10, n=2, extra_body=EXTRA, **params)
    create = client.chat.completions.create if chat else client.completions.create
    kw.update({"messages": HI} if chat else {"prompt": PROMPT})
    whole = create(**kw)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, reasons, usage = joined_stream(chunks)
    assert texts == {c.index: (c.message.content if chat else c.text) for c in whole.choices}
    assert reasons == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and usage == whole.usage and usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    if chat:
        assert {ch.index for ch in chunks[0].choices if ch.delta.role == "assistant"} == {0, 1}


def test_several_prompts_and_token_prompts(client, model):
    prompts = [PROMPT, "The quick brown fox"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, n=2, temperature=1.0, seed=5,
                                  extra_body=EXTRA)
    gs = [model.generate(p, max_new_tokens=5, num_return_sequences=2, temperature=1.0, seed=5, ignore_eos=True)
          for p in prompts]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [g.text for pair in gs for g in pair]  # prompt-major
    ids = model.encode_prompts([PROMPT])[0]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, extra_body=EXTRA)
    assert by_ids.choices[0].text == client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5,
                                                              extra_body=EXTRA).choices[0].text


def test_seed_reproduces_and_extra_fields_apply(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, extra_body={"top_k": 50, **EXTRA})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, extra_body=EXTRA).choices[0].text
    top1 = client.completions.create(seed=9, **{**kw, "extra_body": {"top_k": 1, **EXTRA}}).choices[0].text
    assert top1 == greedy  # top_k reached the sampler


def test_beam_search_arrives_whole(client, model):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=6, n=2, extra_body={"num_beams": 3})
    whole = client.completions.create(**kw)
    ref = model.generate(PROMPT, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert [c.text for c in whole.choices] == [g.text for g in ref]
    chunks = list(client.completions.create(stream=True, **kw))
    texts, reasons, _ = joined_stream(chunks)
    assert texts == {0: ref[0].text, 1: ref[1].text} and set(reasons) == {0, 1}


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, extra_body=EXTRA).choices[0].text
    i = next(i for i in range(4, len(base) - 2) if base[i:i + 2].isprintable() and base[i:i + 2].strip())
    stop = base[i:i + 2]
    expected = base[:base.find(stop)]
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=24, stop=[stop, "\x00never"], extra_body=EXTRA)
    whole = client.completions.create(**kw).choices[0]
    assert whole.text == expected and whole.finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(pieces) == expected
    sofar = ""
    for p in pieces:  # no piece ever released a part of the stop string
        sofar += p
        assert stop not in sofar and expected.startswith(sofar)


def test_logprobs_formats(client, model):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, logprobs=3, extra_body=EXTRA)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4 and value == pytest.approx(max(top.values()))  # greedy: the best
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    g = model.generate(PROMPT, max_new_tokens=6, ignore_eos=True, logprobs=3)
    assert lp.token_logprobs == pytest.approx([t.raw_logprob for t in g.logprobs], abs=1e-5)

    c = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, logprobs=True, top_logprobs=2,
                                       extra_body=EXTRA)
    content = c.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 and t.bytes for t in content)
    assert bytes(b for t in content for b in t.bytes).decode(errors="replace") == c.choices[0].message.content
    streamed = [t for ch in client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, logprobs=True,
                                                           stream=True, extra_body=EXTRA)
                for choice in ch.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in streamed)  # logprobs without top_logprobs: none


# ---------------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("params", [{}, {"temperature": 0.9, "seed": 11}])
def test_concurrent_requests_equal_alone(srv, params):
    prompts = [f"{PROMPT} {i}" for i in range(8)]

    def one(p, stream=False):
        kw = dict(model="tiny", prompt=p, max_tokens=10, extra_body=EXTRA, **params)
        if not stream:
            return srv.client.completions.create(**kw).choices[0].text
        return "".join(c.choices[0].text for c in srv.client.completions.create(stream=True, **kw) if c.choices)

    alone = [one(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: one(prompts[i], stream=i % 2 == 0), range(8)))
    assert together == alone


# ---------------------------------------------------------------------------------- errors


def test_parameter_errors_name_the_field(srv, client):
    cases = [
        ({"prompt": PROMPT, "temperature": -1}, "temperature", None),
        ({"prompt": PROMPT, "max_tokens": -3}, "max_tokens", None),
        ({"prompt": PROMPT, "top_k": "many"}, "top_k", None),
        ({"prompt": PROMPT, "frobnicate": 1}, "frobnicate", None),
        ({"prompt": PROMPT, "logit_bias": {"abc": 1}}, "logit_bias", None),
        ({"prompt": PROMPT, "logit_bias": {"99999": 1}}, "logit_bias", None),  # id past the vocabulary
        ({"prompt": PROMPT, "echo": True}, "echo", None),
        ({"prompt": PROMPT, "suffix": "end"}, "suffix", None),
        ({"prompt": PROMPT, "best_of": 3}, "best_of", None),
        ({"prompt": PROMPT, "n": 99}, "n", None),  # more rows than the engine's batch
        ({"prompt": PROMPT, "stream": "yes"}, "stream", None),
        ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options", None),
        ({"prompt": PROMPT, "prompt_logprobs": 1}, "prompt_logprobs", None),
        ({"prompt": ""}, "prompt", None),
        ({"prompt": [1, "a"]}, "prompt", None),
        ({"prompt": [[5, 99999]]}, "prompt", None),
        ({"prompt": PROMPT, "max_tokens": 500}, "max_tokens", "context_length_exceeded"),
        ({"prompt": LONG}, "prompt", "context_length_exceeded"),
        ({}, "prompt", None),
    ]
    for body, param, code in cases:
        assert_error(post(srv, "/v1/completions", body), 400, param, code)
    chat_cases = [
        ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
        ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": HI, "max_completion_tokens": 4, "max_tokens": 4}, "max_completion_tokens"),
        ({"messages": HI, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ]
    for body, param in chat_cases:
        assert_error(post(srv, "/v1/chat/completions", body), 400, param)
    assert_error(post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}), 400,
                 "messages", "context_length_exceeded")
    assert_error(post(srv, "/v1/chat/completions", {"messages": HI, "max_completion_tokens": 200}), 400,
                 "max_completion_tokens", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as e:  # the client sees the same error
        client.completions.create(model="tiny", prompt=PROMPT, temperature=-1)
    assert e.value.status_code == 400 and e.value.param == "temperature"
    still_serves(client)


def test_http_errors(srv, client):
    assert_error(post(srv, "/v1/completions", {"model": "gpt-9", "prompt": PROMPT}), 404, "model", "model_not_found")
    big = json.dumps({"prompt": "x" * (2 << 20)})
    assert_error(post(srv, "/v1/completions", content=big, headers={"content-type": "application/json"}), 413,
                 code="request_too_large")
    assert_error(post(srv, "/v1/completions", content=b"{not json"), 400, code="invalid_json")
    assert_error(post(srv, "/v1/completions", [1, 2]), 400)
    assert_error(httpx.get(srv.url + "/v1/nothing"), 404, code="not_found")
    assert_error(httpx.get(srv.url + "/v1/completions"), 405, code="method_not_allowed")
    still_serves(client)


def test_full_queue_and_stopping_service(srv, client, monkeypatch):
    monkeypatch.setattr(srv.service, "max_queue", 0)
    r = post(srv, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
    assert_error(r, 429, code="queue_full")
    assert r.headers["retry-after"] == "1"
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    monkeypatch.undo()
    monkeypatch.setattr(srv.service, "accepting", False)
    assert_error(post(srv, "/v1/chat/completions", {"messages": HI, "stream": True}), 503, code="shutting_down")
    monkeypatch.undo()
    monkeypatch.setattr(srv.service, "state", "stopped")
    assert_error(post(srv, "/v1/completions", {"prompt": PROMPT}), 503, code="engine_stopped")
    monkeypatch.undo()
    still_serves(client)


def test_a_request_failing_in_the_engine_fails_alone(srv, client, model, monkeypatch):
    """A request whose decoding raises gets a 500 (or an error event in its stream); the one
    running beside it and those after it are served."""
    make = model.make_request

    def failing_when_seed_is_13(prompt_ids, cfg, emit, **kw):
        req = make(prompt_ids, cfg, emit, **kw)
        if cfg.seed == 13:
            def advance(logits, usable=None):
                raise RuntimeError("injected fault")
            req.advance = advance
        return req

    monkeypatch.setattr(model, "make_request", failing_when_seed_is_13)
    with slow_engine(srv.service, 0.01), ThreadPoolExecutor(1) as pool:
        neighbour = pool.submit(client.completions.create, model="tiny", prompt=PROMPT, max_tokens=20,
                                extra_body=EXTRA)
        err = assert_error(post(srv, "/v1/completions", {"prompt": PROMPT, "seed": 13, "max_tokens": 5}), 500)
        assert err["type"] == "server_error" and "injected fault" in err["message"]
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                          json={"messages": HI, "seed": 13, "max_tokens": 5, "stream": True}) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
        assert "injected fault" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        assert neighbour.result().usage.completion_tokens == 20
    still_serves(client)
    assert srv.service.stats["failed"] >= 2


# ---------------------------------------------------------------------------------- faults


def test_client_disconnect_frees_its_slot(srv):
    service = srv.service
    with slow_engine(service, 0.02):
        aborted = service.stats["aborted"]
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 100, "stream": True, "ignore_eos": True}) as r:
            next(r.iter_lines())
            assert service.running == 1
        assert wait_for(lambda: service.running == 0, 1.0)
        assert service.stats["aborted"] == aborted + 1
        # a non-streamed request whose client gives up is aborted too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", timeout=0.3,
                       json={"prompt": PROMPT, "max_tokens": 100, "ignore_eos": True})
        assert wait_for(lambda: service.running == 0, 1.5)
        assert service.stats["aborted"] == aborted + 2


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_soak_with_random_disconnects(srv):
    """Hundreds of short requests, a third of the streams dropped mid-way: nothing is left running
    or queued and memory comes back near where it was."""
    rng = random.Random(0)

    async def one(client, i):
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": rng.randint(1, 6), "ignore_eos": True,
                "stream": rng.random() < 0.6}
        if body["stream"]:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data") and rng.random() < 0.35:
                        return  # leave mid-stream
        else:
            assert (await client.post("/v1/completions", json=body)).status_code == 200

    async def soak(n):
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            async def limited(i):
                async with sem:
                    await one(client, i)
            await asyncio.gather(*(limited(i) for i in range(n)))

    asyncio.run(soak(40))  # warm-up: allocator pools, caches
    assert wait_for(lambda: srv.service.running == 0, 5)
    gc.collect()
    before = rss_bytes()
    asyncio.run(soak(300))
    s = srv.service
    assert wait_for(lambda: s.running == 0 and s.queue_length == 0 and s.engine.live_rows == 0, 5)
    gc.collect()
    assert rss_bytes() - before < 64 << 20
    assert httpx.get(srv.url + "/health").json()["running"] == 0


def test_health_and_metrics(srv, client):
    still_serves(client)
    r = httpx.get(srv.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["loop"] in ("idle", "running")
    srv.app.state.draining = True
    try:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "draining"
    finally:
        srv.app.state.draining = False
    text = httpx.get(srv.url + "/metrics").text
    for name in ("tokenloom_http_requests_total", "tokenloom_prompt_tokens_total", "tokenloom_generation_tokens_total",
                 "tokenloom_queue_length", "tokenloom_running_requests",
                 "tokenloom_time_to_first_token_seconds_bucket"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(samples['tokenloom_http_requests_total{route="/v1/completions",status="200"}']) >= 1
    assert float(samples["tokenloom_generation_tokens_total"]) >= 2
    count = float(samples["tokenloom_time_to_first_token_seconds_count"])
    assert count >= 1 and float(samples['tokenloom_time_to_first_token_seconds_bucket{le="+Inf"}']) == count


def test_models_tokenize_detokenize(srv, model):
    data = httpx.get(srv.url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny"] and data[0]["object"] == "model"
    tok = post(srv, "/tokenize", {"prompt": PROMPT}).json()
    assert tok["tokens"] == model.tokenizer.encode(PROMPT) and tok["count"] == len(tok["tokens"])
    chat = post(srv, "/tokenize", {"messages": HI}).json()
    assert chat["tokens"] == model.chat_prompt_ids(HI)
    assert post(srv, "/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": PROMPT}
    assert_error(post(srv, "/detokenize", {"tokens": [5, VOCAB + 10]}), 400, "tokens")
    assert_error(post(srv, "/detokenize", {"tokens": [-1]}), 400, "tokens")
    assert_error(post(srv, "/tokenize", {"text": "x"}), 400, "text")


# ---------------------------------------------------------------------------------- encoder-decoder


def save_tiny_t5(folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=48, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=2,
                                num_heads=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(cfg).eval().save_pretrained(folder)
    train_tokenizer(VOCAB).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>"}))


def test_encoder_decoder_completions(tmp_path):
    save_tiny_t5(tmp_path)
    t5 = tokenloom.load(tmp_path, device=DEVICE)
    source = "translate English to German: The fox."
    s = ServerThread(t5, name="t5")
    try:
        r = s.client.completions.create(model="t5", prompt=source, max_tokens=6, extra_body=EXTRA)
        assert r.choices[0].text == t5.generate(source, max_new_tokens=6, ignore_eos=True).text
        assert r.usage.prompt_tokens == len(t5.encode_prompts([source])[0])
        texts, _, _ = joined_stream(s.client.completions.create(model="t5", prompt=source, max_tokens=6,
                                                                stream=True, extra_body=EXTRA))
        assert texts == {0: r.choices[0].text}
        beams = s.client.completions.create(model="t5", prompt=source, max_tokens=5, n=2,
                                            extra_body={"num_beams": 2})
        ref = t5.generate(source, max_new_tokens=5, num_beams=2, num_return_sequences=2)
        assert [c.text for c in beams.choices] == [g.text for g in ref]
    finally:
        s.close()


# ---------------------------------------------------------------------------------- the command


def test_serve_command_drains_on_sigterm(folder, tmp_path):
    """`tokenloom serve` in its own process: SIGTERM with a request in flight lets the request
    finish, refuses new ones, and exits 0."""
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tokenloom", "serve", "-m", str(folder), "--port", "0",
                             "--served-model-name", "tiny", "--log-level", "warning", "--device", DEVICE],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("tokenloom: serving tiny at http://127.0.0.1:"), (line, (tmp_path / "stderr.txt").read_text())
        base = line.split(" at ")[1].strip().removesuffix("/v1")
        body = {"prompt": PROMPT, "max_tokens": 100, "n": 4, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            events = sse_events([first, *lines])
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 400
        assert wait_for(lambda: proc.poll() is not None, 30)
        assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
        with pytest.raises(httpx.ConnectError):
            httpx.get(base + "/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_serve_command_checks_its_flags():
    r = subprocess.run([sys.executable, "-m", "tokenloom", "serve", "--max-batch", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "--max-batch must be at least 1" in r.stderr
