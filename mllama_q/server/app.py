"""The ASGI application: routes of both API families, API-key check, one log line per request.

    app = create_app(engine, info, ServerConfig(api_key="..."))
    uvicorn.run(app, host="127.0.0.1", port=8080)

The model loads in a thread started at application start-up; /health answers 503 until it is
ready (llama.cpp's server does the same), and generation routes answer 503 meanwhile.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import ollama_api, openai_api
from .engine import Engine
from .errors import APIError
from .images import ImageLimits
from .info import ModelInfo
from .transport import STATS_KEY, error_for_path

log = logging.getLogger("mllama_q.server")

# Reachable without the API key: liveness probes (llama.cpp's server exempts /health too).
PUBLIC_PATHS = frozenset({"/", "/health", "/api/version"})


@dataclass
class ServerConfig:
    api_key: str | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    image_limits: ImageLimits = field(default_factory=ImageLimits)


@dataclass
class ServerState:
    engine: Engine
    info: ModelInfo
    config: ServerConfig


async def health(request: Request):
    engine: Engine = request.app.state.server.engine
    if engine.state == "ready":
        return JSONResponse({"status": "ok"})
    if engine.state == "loading":
        return JSONResponse(
            {"status": "loading", "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
            status_code=503,
        )
    return JSONResponse(
        {
            "status": "error",
            "error": {"code": 500, "message": f"the model failed to load: {engine.error}", "type": "server_error"},
        },
        status_code=500,
    )


async def slots(request: Request):
    """Slot states and the queue (llama.cpp's server: GET /slots)."""
    engine: Engine = request.app.state.server.engine
    if engine.pool is None:
        return JSONResponse({"slots": [], "queued": 0})
    return JSONResponse({"slots": [s.status() for s in engine.pool.slots], "queued": engine.pool.n_waiting})


class Gate:
    """Outermost middleware: the access log line (method, path, status, token counts, timings)
    and, when an API key is set, `Authorization: Bearer KEY` on every non-public path."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [0]
        st = scope.setdefault(STATS_KEY, {})

        async def send_(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if "slot" in st:  # which slot served the request (debugging, tests)
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"x-mllama-q-slot", str(st["slot"]).encode())],
                    }
            await send(message)

        try:
            path = scope.get("path", "")
            if self.key is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
                has = any(n == b"authorization" for n, _ in scope.get("headers", ()))
                err = APIError(
                    401,
                    "invalid API key" if has else "missing API key: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                )
                st["error"] = err.message
                await error_for_path(path, err)(scope, receive, send_)
                return
            await self.app(scope, receive, send_)
        finally:
            log.info("%s", _log_line(scope, status[0], time.perf_counter() - t0, st))


def _log_line(scope: Scope, status: int, dt: float, st: dict) -> str:
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "-"
    parts = [who, scope.get("method", "-"), scope.get("path", "-"), str(status or "-"), f"{dt:.3f}s"]
    if "prompt" in st:
        cached = st.get("cached")
        parts.append(
            f"prompt={st['prompt']}" + (f" cached={cached}" if cached is not None else f" reused~{st.get('reused', 0)}")
        )
    if "gen" in st:
        parts.append(f"gen={st['gen']}")
        if st.get("ttft") is not None:
            parts.append(f"ttft={st['ttft']:.3f}s")
        if st.get("tps"):
            parts.append(f"{st['tps']:.1f}tok/s")
        parts.append(f"stop={st.get('stop')}")
    if "slot" in st:
        parts.append(f"slot={st['slot']}")
    if st.get("disconnected"):
        parts.append("client-disconnected")
    if st.get("error"):
        parts.append(f"error={st['error'][:200]!r}")
    return " ".join(parts)


def _not_found(request: Request, exc):
    status = getattr(exc, "status_code", 404)
    msg = (
        f"no route {request.method} {request.url.path}"
        if status == 404
        else f"method {request.method} is not allowed on {request.url.path}"
    )
    request.scope.setdefault(STATS_KEY, {})["error"] = msg
    return error_for_path(request.url.path, APIError(status, msg))


def create_app(
    engine: Engine,
    info: ModelInfo,
    config: ServerConfig | None = None,
    on_load_failed: Callable[[str], None] | None = None,
) -> ASGIApp:
    """The application. If the engine is still loading, loading starts (in a thread) when the
    app starts; `on_load_failed(message)` is called if it fails (the CLI then exits)."""
    config = config or ServerConfig()
    state = ServerState(engine=engine, info=info, config=config)
    if engine.state == "ready":
        info.describe(engine.model)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine.state == "loading":

            def load():
                try:
                    engine.load()
                    info.describe(engine.model)
                    log.info(
                        "model ready: %s (%d slots, n_ctx %d, loaded in %.1f s)",
                        info.name,
                        engine.parallel,
                        engine.n_ctx,
                        engine.load_s or 0.0,
                    )
                except Exception as e:
                    log.error("cannot load the model: %s", engine.error or e)
                    if on_load_failed is not None:
                        on_load_failed(engine.error or str(e))

            threading.Thread(target=load, name="mllama-q-load", daemon=True).start()
        yield

    routes = [
        Route("/", ollama_api.root, methods=["GET", "HEAD"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/slots", slots, methods=["GET"]),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/v1/models", openai_api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", openai_api.get_model, methods=["GET"]),
        Route("/api/chat", ollama_api.chat, methods=["POST"]),
        Route("/api/generate", ollama_api.generate, methods=["POST"]),
        Route("/api/tags", ollama_api.tags, methods=["GET", "HEAD"]),
        Route("/api/show", ollama_api.show, methods=["POST"]),
        Route("/api/ps", ollama_api.ps, methods=["GET"]),
        Route("/api/version", ollama_api.version, methods=["GET", "HEAD"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: _not_found, 405: _not_found})
    app.state.server = state
    return Gate(app, config.api_key)
