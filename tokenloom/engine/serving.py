"""The engine on its own thread, for many clients at once (the HTTP server, or Python threads).

`EngineService.submit()` is thread-safe and returns a `RequestStream` of StreamDelta objects,
readable with a plain `for` or with `async for`. The loop thread is the only one that touches
the engine: submits and aborts reach it through an inbox and take effect at the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections import deque

from tokenloom.errors import TokenloomError

_END = object()


class QueueFullError(TokenloomError):
    """The engine's waiting queue is full; try again later."""


class ServiceStoppedError(TokenloomError):
    """The engine is shutting down and takes no new requests."""


class RequestStream:
    """The deltas of one request, as they are made. Iterate it (sync or async); `abort()` ends it."""

    def __init__(self, service: "EngineService", rid: int, prompt_tokens: int, n: int):
        self.service, self.id, self.prompt_tokens, self.n = service, rid, prompt_tokens, n
        self.request = None  # the engine's Request, set by submit()
        self.created = time.monotonic()
        self.first_token_at: float | None = None
        self.generated = 0
        self.error: str | None = None
        self.closed = False
        try:
            self._loop = asyncio.get_running_loop()
            self._aq: asyncio.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    # engine thread ---------------------------------------------------------

    def _put(self, item) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:  # the client's event loop is gone
                pass
        else:
            self._q.put(item)

    def push(self, delta) -> None:
        if delta.token_ids:
            self.generated += len(delta.token_ids)
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
        self._put(delta)

    def close(self, error: str | None = None) -> None:
        if not self.closed:
            self.closed, self.error = True, error
            self._put(_END)

    # client side -------------------------------------------------------------

    def abort(self) -> None:
        self.service.abort(self)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is _END:
                if self.error:
                    raise TokenloomError(self.error)
                return
            yield item

    async def __aiter__(self):
        while True:
            item = await self._aq.get()
            if item is _END:
                if self.error:
                    raise TokenloomError(self.error)
                return
            yield item


class EngineService:
    """Runs an Engine for a loaded `tokenloom.api.Model` on a background thread."""

    def __init__(self, model, max_batch: int = 32, max_queue: int = 256, prefill_chunk: int | None = None):
        from tokenloom.engine.engine import PREFILL_CHUNK, Engine

        self.model, self.max_queue = model, max_queue
        self.engine = Engine(model.network, model.dtype, model.device, max_batch=max_batch,
                             prefill_chunk=prefill_chunk or PREFILL_CHUNK)
        self._inbox: deque = deque()
        self._cv = threading.Condition()
        self._ids = itertools.count(1)
        self._live: dict[int, RequestStream] = {}
        self.accepting = True
        self.state = "starting"
        self.heartbeat = time.monotonic()
        self.step_started: float | None = None
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "failed": 0, "prompt_tokens": 0,
                      "generated_tokens": 0, "steps": 0, "ttft_sum": 0.0, "ttft_count": 0}
        self.ttft_buckets = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
        self.ttft_counts = [0] * (len(self.ttft_buckets) + 1)
        self._thread = threading.Thread(target=self._run, name="tokenloom-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client API (any thread)

    @property
    def queue_length(self) -> int:
        return len(self.engine.waiting) + sum(1 for op, _ in list(self._inbox) if op == "add")

    @property
    def running(self) -> int:
        return len(self._live)

    def submit(self, prompt_ids: list[int], config) -> RequestStream:
        """Queue a request; raises QueueFullError when `max_queue` requests already wait."""
        if not self.accepting:
            raise ServiceStoppedError("the server is shutting down")
        if self.queue_length >= self.max_queue:
            raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)")
        rid = next(self._ids)
        stream = RequestStream(self, rid, len(prompt_ids), config.num_return_sequences)
        stream.request = self.model.make_request(prompt_ids, config, stream.push, rid=rid)
        self.engine.check(stream.request)
        with self._cv:
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(prompt_ids)
            self._inbox.append(("add", stream))
            self._cv.notify()
        return stream

    def abort(self, stream: RequestStream) -> None:
        with self._cv:
            self._inbox.append(("abort", stream))
            self._cv.notify()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; finish those in flight (or abort them), then stop the loop."""
        self.accepting = False
        with self._cv:
            self._inbox.append(("stop", drain))
            self._cv.notify()
        self._thread.join(timeout)

    def health(self) -> dict:
        now = time.monotonic()
        alive = self._thread.is_alive()
        busy_for = 0.0 if self.step_started is None else now - self.step_started
        status = "ok" if alive and self.state in ("idle", "running") and busy_for < 60 else "unhealthy"
        if alive and self.state == "draining":
            status = "draining"
        return {"status": status, "loop": self.state, "thread_alive": alive, "step_seconds": round(busy_for, 3),
                "seconds_since_heartbeat": round(now - self.heartbeat, 3), "running": self.running,
                "waiting": self.queue_length, "kv_cache_bytes": self.engine.cache.nbytes}

    # ------------------------------------------------------------------ the loop (engine thread)

    def _run(self) -> None:
        stopping, drain = False, True
        self.state = "idle"
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self.engine.has_work and not stopping:
                        self.heartbeat = time.monotonic()
                        self._cv.wait(timeout=0.5)
                    ops = list(self._inbox)
                    self._inbox.clear()
                for op, arg in ops:
                    if op == "add":
                        self._live[arg.id] = arg
                        self.engine.add(arg.request)
                    elif op == "abort":
                        self._abort(arg)
                    else:
                        stopping, drain = True, arg
                        self.state = "draining"
                if stopping and not drain:
                    for stream in list(self._live.values()):
                        self._abort(stream)
                if stopping and not self.engine.has_work:
                    break
                self.state = "draining" if stopping else "running"
                self.heartbeat = self.step_started = time.monotonic()
                try:
                    self.engine.step()
                except Exception as e:  # noqa: BLE001 - a batch-wide failure: fail the batch, keep serving
                    self.engine.fail_all(e)
                self.step_started = None
                self.stats["steps"] += 1
                self._collect()
                if not self.engine.has_work and not stopping:
                    self.state = "idle"
        finally:
            self.state = "stopped"
            for stream in list(self._live.values()):
                stream.close("the engine stopped")

    def _abort(self, stream: RequestStream) -> None:
        if stream.id in self._live and stream.request is not None and not stream.request.done:
            self.engine.abort(stream.request)
            self.stats["aborted"] += 1
        self._live.pop(stream.id, None)
        stream.close()

    def _collect(self) -> None:
        """Close the streams whose requests ended in this step; count them."""
        for rid, stream in list(self._live.items()):
            req = stream.request
            if not req.done:
                continue
            del self._live[rid]
            self.stats["generated_tokens"] += stream.generated
            if req.error:
                self.stats["failed"] += 1
            else:
                self.stats["finished"] += 1
            if stream.first_token_at is not None:
                ttft = stream.first_token_at - stream.created
                self.stats["ttft_sum"] += ttft
                self.stats["ttft_count"] += 1
                self.ttft_counts[next((i for i, b in enumerate(self.ttft_buckets) if ttft <= b),
                                      len(self.ttft_buckets))] += 1
            stream.close(req.error)
