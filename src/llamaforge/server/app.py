"""The FastAPI application: `create_app(...)`, the model manager, /health, /metrics, error handling.

    app = create_app(ServerConfig(models=["smollm2"]))             # loads in the background; /health 503 until done
    app = create_app(ServerConfig(), preloaded={"smollm2": lm})     # tests: a model already in memory
    serve(app, host="127.0.0.1", port=11435)                        # uvicorn with graceful stream shutdown
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import __version__
from ..errors import LlamaforgeError, ModelNotFoundError
from .common import api_error_from, error_response, json_response
from .metrics import CONTENT_TYPE, Metrics
from .models import ModelManager
from .schemas import ApiError
from .security import DEFAULT_MAX_BODY, SecurityMiddleware, is_loopback_host

log = logging.getLogger("llamaforge.server")

DEFAULT_PORT = 11435
DEFAULT_KEEP_ALIVE_S = 300.0   # models loaded on demand stay 5 minutes after their last use (as Ollama)


@dataclass
class ServerConfig:
    """Everything `llamaforge serve` can set. Models named here are loaded at start and never unloaded."""

    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | list[str] | None = None   # several keys: several users (their own web UI conversations)
    max_batch: int = 8
    max_queue: int = 64
    ctx: int | None = None                 # per-request context window (KV cache rows); None = engine default
    max_body: int = DEFAULT_MAX_BODY
    allowed_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    load_on_demand: bool = True            # store models not named at start load on first request
    keep_alive: float = DEFAULT_KEEP_ALIVE_S
    max_loaded: int = 2
    dtype: str | None = None
    quant: str | None = None               # in-memory weight format (llamaforge.load's `quant`); None = default
    threads: int | None = None             # serve --threads: wins over a model's num_thread (process-wide)
    guards: Any = None                     # generate.request.Guards applied to every request (serve --guard-*)
    header_timeout: float = 10.0           # seconds a connection may take to send a request's headers
    keep_alive_timeout: float = 5.0        # seconds an idle keep-alive connection stays open
    max_connections: int | None = None     # open connections at once (default: from the descriptor limit)
    exit_on_load_failure: bool = False     # `llamaforge serve`: a model named at start that fails to load stops it
    allow_pull_from: list[str] = field(default_factory=list)  # directories /api/pull may read local models from
    speculate: str | None = None           # serve --speculate off|ngram|draft (generate/speculative.py)
    draft: str | None = None               # serve --draft MODEL: drafts for every served model (same tokenizer)
    draft_tokens: int | None = None        # serve --draft-tokens K


class ServerState:
    """Attached to `app.state.server`; what every route needs."""

    def __init__(self, config: ServerConfig, loader=None, preloaded=None):
        self.config = config
        self.metrics = Metrics(lambda: self.models.gauges())
        self.models = ModelManager(config, self.metrics, loader, preloaded)
        self.started = time.time()
        self.shutting_down = False

    def begin_shutdown(self) -> None:
        """End every open stream with a final event now (called before uvicorn waits for connections)."""
        if not self.shutting_down:
            self.shutting_down = True
            self.models.shutdown()


def create_app(config: ServerConfig | None = None, *, preloaded: dict[str, Any] | None = None,
               loader: Callable | None = None) -> FastAPI:
    """Build the app. `preloaded` maps served names to `LoadedModel`s already in memory; `config.models` are
    loaded in a background thread at startup (and /health says 503 until they are in)."""
    config = config or ServerConfig()
    state = ServerState(config, loader, preloaded)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loader_thread = None
        if config.models:
            loader_thread = threading.Thread(target=state.models.preload, name="model-preload", daemon=True)
            loader_thread.start()
        reaper = asyncio.create_task(_reap_forever(state))
        try:
            yield
        finally:
            reaper.cancel()
            state.begin_shutdown()

    app = FastAPI(title="llamaforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state

    from .ollama_admin import router as ollama_admin_router
    from .ollama_pull import router as ollama_pull_router
    from .ollama_routes import router as ollama_router
    from .openai_routes import router as openai_router
    from .ui_routes import router as ui_router
    app.include_router(openai_router)
    app.include_router(ui_router)  # the web chat page at /ui and its conversation store
    app.include_router(ollama_router)
    app.include_router(ollama_admin_router)
    app.include_router(ollama_pull_router)
    from .tokenize_routes import router as tokenize_router  # vLLM-style /tokenize (lm-eval local-completions)
    app.include_router(tokenize_router)
    from .rag_routes import router as rag_router
    app.include_router(rag_router)  # /v1/rag/... (retrieval collections)
    _add_basic_routes(app, state)
    _add_error_handlers(app)

    app.add_middleware(_CountRequests, metrics=state.metrics)
    app.add_middleware(
        SecurityMiddleware, api_key=config.api_key, loopback_only=is_loopback_host(config.host),
        allowed_hosts=config.allowed_hosts, allowed_origins=config.allowed_origins, max_body=config.max_body,
        on_reject=lambda path, status: state.metrics.requests.inc(route="rejected", status=str(status)))
    return app


class _CountRequests:
    """Pure ASGI (BaseHTTPMiddleware would buffer streams and hide disconnects): count and time requests."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            seconds = time.perf_counter() - t0
            self.metrics.requests.inc(route=route, status=str(status["code"]))
            self.metrics.latency.observe(seconds, route=route)
            _log_request(scope, status["code"], seconds)


def _log_request(scope, status: int, seconds: float) -> None:
    """One line per request: method, route, status, model, tokens, milliseconds (and the caller's user id)."""
    info = (scope.get("state") or {}).get("llamaforge") or {}
    parts = [scope.get("method", "?"), scope.get("path", "?"), str(status)]
    if info.get("model"):
        parts.append(f"model={info['model']}")
    gen = info.get("generation")
    if gen is not None:
        u = gen.usage()
        parts.append(f"tokens={u['prompt_tokens']}+{u['completion_tokens']}")
    parts.append(f"{seconds * 1000:.0f}ms")
    if info.get("user"):
        parts.append(f"user={info['user']!r}")
    log.info(" ".join(parts))


async def _reap_forever(state: ServerState) -> None:
    while True:
        await asyncio.sleep(1.0)
        try:
            state.models.reap()
        except Exception:
            log.exception("unloading idle models failed")


def _add_basic_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        m = state.models
        if m.preload_error:
            return json_response({"status": "error", "error": m.preload_error}, 503)
        if m.preloading:
            return json_response({"status": "loading"}, 503, {"Retry-After": "2"})
        if state.shutting_down:
            return json_response({"status": "shutting down"}, 503)
        return json_response({"status": "ok", "models": sorted(m.entries)})

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/debug/scheduler")
    async def debug_scheduler():
        """Batch slots per model: active (holding a row), queued (waiting), steps taken."""
        with state.models._lock:
            entries = list(state.models.entries.values())
        return json_response({"models": {e.name: e.scheduler.debug() for e in entries}})

    @app.get("/")
    async def root():
        # Ollama clients probe "/" for "Ollama is running"; browsers get the same one-liner.
        return Response("llamaforge is running", media_type="text/plain")

    @app.head("/")
    async def root_head():
        return Response(media_type="text/plain")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(request.url.path, exc)

    @app.exception_handler(LlamaforgeError)
    async def on_llamaforge_error(request: Request, exc: LlamaforgeError):
        try:
            err = api_error_from(exc)
        except LlamaforgeError:
            err = ApiError(400 if not isinstance(exc, ModelNotFoundError) else 404, str(exc))
        return error_response(request.url.path, err)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.url.path!r}", 405: f"method {request.method} not allowed on "
               f"{request.url.path!r}"}.get(exc.status_code, str(exc.detail))
        return error_response(request.url.path, ApiError(exc.status_code, msg, headers=exc.headers))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, ApiError(500, f"internal error: {type(exc).__name__}",
                                                         type="server_error"))


# ---------------------------------------------------------------------------------------------------- running
def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, log_level: str = "info",
                graceful_timeout: float = 10.0):
    """A uvicorn server that ends open streams (final event) as soon as shutdown begins, instead of waiting
    for them to finish on their own."""
    import uvicorn

    class _Server(uvicorn.Server):
        fatal_error: str | None = None

        async def shutdown(self, sockets=None):
            app.state.server.begin_shutdown()
            await super().shutdown(sockets=sockets)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down; a graceful stop is a clean exit (status 0).
            self._captured_signals.clear()

    from .connections import guarded_protocol
    conf = app.state.server.config
    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                         lifespan="on", access_log=False, timeout_keep_alive=conf.keep_alive_timeout,
                         http=guarded_protocol(conf.header_timeout, conf.max_connections or _default_max_connections()),
                         h11_max_incomplete_event_size=64 * 1024)
    server = _Server(cfg)
    if conf.exit_on_load_failure:
        def fatal(message: str) -> None:
            server.fatal_error = message
            server.should_exit = True
        app.state.server.models.on_fatal = fatal
    return server


def _default_max_connections() -> int:
    """Open connections allowed: well below the process's file-descriptor limit (model files, logs and the
    listening socket need some), at most 1024."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 4096
    except (ImportError, ValueError, OSError):
        soft = 1024
    return max(8, min(1024, soft - 64))
