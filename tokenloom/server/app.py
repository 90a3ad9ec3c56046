"""The OpenAI-compatible HTTP server: routes that translate HTTP to EngineService calls and back.

Validation lives in GenerationConfig (through protocol.py); the engine runs on its own thread
(engine/serving.py). Every error, ours or the framework's, has OpenAI's body
{"error": {"message", "type", "param", "code"}}.

Endpoints: POST /v1/completions, POST /v1/chat/completions (JSON, or SSE with `stream`),
GET /v1/models, POST /tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenloom.engine.serving import QueueFullError, ServiceStoppedError
from tokenloom.errors import InvalidParameterError, PromptError, TokenloomError
from tokenloom.server.protocol import RequestError, invalid, parse_chat, parse_completion, parse_messages
from tokenloom.server.responses import ResponseBuilder, TokenText

MAX_BODY_BYTES = 1 << 20
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


def create_app(service, model_name: str | None = None, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving `service` (an EngineService) under `model_name` (default: the model's name).

    Its lifespan's shutdown drains the service: requests in flight finish, then the engine stops."""
    model = service.model
    name = model_name or model.name
    tokens = TokenText(model.tokenizer)
    started = int(time.time())
    counts: collections.Counter = collections.Counter()

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.shutdown, True)

    app = FastAPI(title="tokenloom", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.model_name, app.state.draining = service, name, False
    app.state.http_counts = counts
    app.add_middleware(_CountResponses, counts=counts)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):  # unknown route, wrong method
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        err = RequestError(e.status_code, str(e.detail), param=None, code=code, headers=getattr(e, "headers", None))
        return await request_error(request, err)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug: still OpenAI's body, and the server goes on
        err = RequestError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return await request_error(request, err)

    # ------------------------------------------------------------------ generation

    def check_model(body) -> None:
        requested = body.get("model") if isinstance(body, dict) else None
        if isinstance(requested, str) and requested != name:
            raise RequestError(404, f"the model '{requested}' does not exist; this server serves '{name}'",
                               param="model", code="model_not_found")

    def prompt_ids(parsed) -> list[list[int]]:
        param = "messages" if parsed.messages is not None else "prompt"
        try:
            if parsed.messages is not None:
                ids = [model.chat_prompt_ids(parsed.messages)]
            elif isinstance(parsed.prompts[0], str):
                ids = model.encode_prompts(parsed.prompts)
            else:
                ids = parsed.prompts
                _check_ids(ids, _vocab_size(model), "prompt")
                if any(len(p) >= model.context_length for p in ids):
                    raise PromptError(f"a prompt is longer than the model's context window ({model.context_length})")
        except PromptError as e:  # a prompt that is empty, or too long for the window (its message says which)
            code = "context_length_exceeded" if "context window" in str(e) else None
            raise invalid(str(e), param, code) from None
        except TokenloomError as e:  # a chat template that refuses the messages, ...
            raise invalid(str(e), param) from None
        limit_param = parsed.max_tokens_param
        encoder_decoder = getattr(model.network, "is_encoder_decoder", False)
        for p in ids:
            used = 1 if encoder_decoder else len(p)  # an encoder's source does not share the decoder's window
            if limit_param and used + parsed.config.max_new_tokens > model.context_length:
                raise invalid(f"this model's context window is {model.context_length} tokens; the prompt takes "
                              f"{used} and {limit_param} asks for {parsed.config.max_new_tokens}",
                              limit_param, "context_length_exceeded")
        return ids

    def submit(parsed, ids: list[list[int]]) -> list:
        if service.state == "stopped":  # the engine loop is gone: a request would wait forever
            raise RequestError(503, "the engine is not running", type="service_unavailable", code="engine_stopped")
        streams = []
        try:
            for p in ids:
                streams.append(service.submit(p, parsed.config))
        except BaseException as e:
            _abort(streams)
            if isinstance(e, QueueFullError):
                raise RequestError(429, str(e), type="rate_limit_error", code="queue_full",
                                   headers={"Retry-After": "1"}) from None
            if isinstance(e, ServiceStoppedError):
                raise RequestError(503, str(e), type="service_unavailable", code="shutting_down") from None
            if isinstance(e, InvalidParameterError):
                raise invalid(str(e), parsed.names.get(e.field, e.field)) from None
            if isinstance(e, TokenloomError):
                raise invalid(str(e)) from None
            raise
        return streams

    async def generate(request: Request, chat: bool):
        body = await _read_json(request, max_body_bytes)
        check_model(body)
        parsed = (parse_chat if chat else parse_completion)(body, model.defaults)
        ids = prompt_ids(parsed)
        streams = submit(parsed, ids)
        n = parsed.config.num_return_sequences
        builder = ResponseBuilder(chat, name, tokens, n * len(ids), sum(len(p) for p in ids))
        if parsed.stream:
            # the background task aborts what is left even if the generator is never resumed (a send that failed)
            return StreamingResponse(_sse(builder, streams, n, parsed.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(_abort, streams))
        if not await _collect(request, builder, streams, n):
            return Response(status_code=499)  # the client left; nobody reads this
        return JSONResponse(builder.response())

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    # ------------------------------------------------------------------ the rest

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started, "owned_by": "tokenloom",
                                            "max_model_len": model.context_length}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _read_json(request, max_body_bytes)
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        check_model(body)
        _only(body, {"model", "prompt", "messages", "add_special_tokens"})
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise invalid("'add_special_tokens' must be true or false", "add_special_tokens")
        if ("prompt" in body) == ("messages" in body):
            raise invalid("give either 'prompt' (a string) or 'messages'", "prompt")
        if "prompt" in body:
            if not isinstance(body["prompt"], str):
                raise invalid("'prompt' must be a string", "prompt")
            ids = model.tokenizer.encode(body["prompt"], add_special_tokens=special)
        else:
            from tokenloom.tokenizer.chat_template import chat_ids

            try:  # not chat_prompt_ids: a conversation longer than the window is still counted
                ids = chat_ids(model.tokenizer, parse_messages(body["messages"]))
            except TokenloomError as e:
                raise invalid(str(e), "messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": model.context_length}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _read_json(request, max_body_bytes)
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        check_model(body)
        _only(body, {"model", "tokens"})
        ids = body.get("tokens")
        if not isinstance(ids, list):
            raise invalid("'tokens' must be a list of token ids", "tokens")
        _check_ids([ids], model.tokenizer.vocab_size, "tokens")
        return {"prompt": model.tokenizer.decode(ids, skip_special_tokens=False)}

    @app.get("/health")
    async def health():
        h = service.health()
        if app.state.draining and h["status"] == "ok":
            h["status"] = "draining"
        return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_metrics_text(service, counts), media_type="text/plain; version=0.0.4")

    return app


# ---------------------------------------------------------------------------------- helpers


def _vocab_size(model) -> int:
    from tokenloom.engine.generate import _vocab_size as size

    return size(model.network)


def _check_ids(prompts: list[list], vocab: int, param: str) -> None:
    for p in prompts:
        bad = next((t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None or not p:
            raise invalid(f"token ids must be integers in [0, {vocab}); got {bad!r}" if p else "no token ids", param)


def _only(body: dict, allowed: set) -> None:
    for key in body:
        if key not in allowed:
            raise invalid(f"unknown parameter '{key}'", key)


async def _read_json(request: Request, limit: int):
    """The body as JSON; 413 past `limit` bytes (read no further), 400 when it is not JSON."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _abort(streams) -> None:
    for s in streams:
        if not s.closed:
            s.abort()


async def _merged(streams):
    """(prompt index, delta) from the streams of every prompt, as they come."""
    if len(streams) == 1:
        async for d in streams[0]:
            yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p, stream):
        try:
            async for d in stream:
                queue.put_nowait((p, d))
            queue.put_nowait((p, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader, who raises it
            queue.put_nowait((p, e))

    tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            p, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield p, item
    finally:
        for t in tasks:
            t.cancel()


def _deltas(streams, n: int):
    """Each delta with its choice index (prompt-major); failed sequences' "error" deltas are dropped
    (their stream raises the error after them)."""
    async def gen():
        async for p, d in _merged(streams):
            if d.finish_reason != "error":
                yield dataclasses.replace(d, index=p * n + d.index)
    return gen()


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _sse(builder, streams, n: int, include_usage: bool):
    """Server-sent events: one chunk per delta, [DONE] at the end. A client that disconnects
    cancels this generator (Starlette watches the connection): its requests are aborted."""
    try:
        if builder.chat:
            yield _event(builder.role_chunk(include_usage))
        async for d in _deltas(streams, n):
            choice = builder.add(d)
            if choice is not None:
                yield _event(builder.chunk(choice, include_usage))
        if include_usage:
            yield _event(builder.usage_chunk())
    except TokenloomError as e:  # this request failed in the engine: tell the client, end the stream
        yield _event(RequestError(500, f"generation failed: {e}", type="server_error").body())
    finally:
        _abort(streams)
    yield b"data: [DONE]\n\n"


async def _collect(request: Request, builder, streams, n: int) -> bool:
    """Feed every delta to `builder`; False when the client disconnected first (its requests aborted)."""
    async def run():
        async for d in _deltas(streams, n):
            builder.add(d)

    task = asyncio.create_task(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                return False
        task.result()
        return True
    except TokenloomError as e:
        raise RequestError(500, f"generation failed: {e}", type="server_error") from None
    finally:
        task.cancel()
        _abort(streams)


class _CountResponses:
    """ASGI middleware: counts responses by route and status, for /metrics."""

    def __init__(self, app, counts: collections.Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counts[(route, message["status"])] += 1
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:  # answered with a 500 by the outer error middleware
                self.counts[(route, 500)] += 1
            raise


def _metrics_text(service, counts: collections.Counter) -> str:
    """Prometheus' text exposition format."""
    s = service.stats
    lines = ["# HELP tokenloom_http_requests_total HTTP responses by route and status code.",
             "# TYPE tokenloom_http_requests_total counter"]
    lines += [f'tokenloom_http_requests_total{{route="{r}",status="{c}"}} {v}' for (r, c), v in sorted(counts.items())]
    lines += ["# HELP tokenloom_requests_total Engine requests by outcome.", "# TYPE tokenloom_requests_total counter"]
    lines += [f'tokenloom_requests_total{{outcome="{k}"}} {s[k]}' for k in ("finished", "aborted", "failed")]
    for metric, key, help_ in (("prompt_tokens_total", "prompt_tokens", "Prompt tokens submitted."),
                               ("generation_tokens_total", "generated_tokens", "Tokens generated."),
                               ("engine_steps_total", "steps", "Engine steps run.")):
        lines += [f"# HELP tokenloom_{metric} {help_}", f"# TYPE tokenloom_{metric} counter",
                  f"tokenloom_{metric} {s[key]}"]
    for metric, value, help_ in (("queue_length", service.queue_length, "Requests waiting for a batch slot."),
                                 ("running_requests", service.running, "Requests admitted and not finished.")):
        lines += [f"# HELP tokenloom_{metric} {help_}", f"# TYPE tokenloom_{metric} gauge",
                  f"tokenloom_{metric} {value}"]
    lines += ["# HELP tokenloom_time_to_first_token_seconds Time from submission to the first generated token.",
              "# TYPE tokenloom_time_to_first_token_seconds histogram"]
    total = 0
    for bound, c in zip([*service.ttft_buckets, "+Inf"], list(service.ttft_counts)):
        total += c  # the service counts per bucket; Prometheus buckets are cumulative
        lines.append(f'tokenloom_time_to_first_token_seconds_bucket{{le="{bound}"}} {total}')
    lines += [f"tokenloom_time_to_first_token_seconds_sum {s['ttft_sum']}",
              f"tokenloom_time_to_first_token_seconds_count {s['ttft_count']}"]
    return "\n".join(lines) + "\n"
