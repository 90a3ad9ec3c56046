"""The OpenAI-compatible HTTP server (`tokenloom serve`): FastAPI routes over an EngineService.

    from tokenloom.server import serve
    serve(tokenloom.load("smollm2-135m-instruct"), port=8000)   # blocks; SIGTERM drains and exits 0
"""

from __future__ import annotations

import signal
import threading

import uvicorn

from tokenloom.server.app import MAX_BODY_BYTES, create_app

__all__ = ["create_app", "serve", "Server", "MAX_BODY_BYTES"]


def serve(model, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 32, max_queue: int = 256,
          max_body_bytes: int = MAX_BODY_BYTES, model_name: str | None = None, log_level: str = "info") -> None:
    """Serve `model` until SIGINT / SIGTERM. Shutdown is graceful: new requests get 503 (new
    connections are refused), those in flight finish, then the engine stops and this returns."""
    from tokenloom.engine.serving import EngineService

    service = EngineService(model, max_batch=max_batch, max_queue=max_queue)
    app = create_app(service, model_name, max_body_bytes=max_body_bytes)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it, under the handler found at start; a no-op
        # one makes a graceful SIGTERM end with exit status 0 rather than death by the signal
        signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        service.shutdown(drain=False, timeout=5)  # when startup failed (port taken) no lifespan shutdown ran


class Server(uvicorn.Server):
    """uvicorn's server that stops taking requests as soon as a signal comes, and says where it listens."""

    def handle_exit(self, sig, frame):
        # new requests on open connections get 503 while uvicorn waits for those in flight
        app = self.config.app
        app.state.draining = True
        app.state.service.accepting = False
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"tokenloom: serving {self.config.app.state.model_name} at http://{host}:{port}/v1", flush=True)
