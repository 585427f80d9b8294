"""The FastAPI application: `create_app(...)`, the model manager, /health, /metrics, error handling.

    app = create_app(ServerConfig(models=["smollm2"]))             # loads in the background; /health 503 until done
    app = create_app(ServerConfig(), preloaded={"smollm2": lm})     # tests: a model already in memory
    serve(app, host="127.0.0.1", port=11435)                        # uvicorn with graceful stream shutdown
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import __version__
from ..errors import LlamaforgeError, ModelNotFoundError
from .common import api_error_from, error_response, json_response
from .metrics import CONTENT_TYPE, Metrics
from .scheduler import Scheduler
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
    api_key: str | None = None
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


@dataclass(eq=False)
class ModelEntry:
    """A loaded model and its scheduler."""

    name: str
    lm: Any
    scheduler: Scheduler
    load_seconds: float
    pinned: bool                      # named at start: never unloaded
    expires_at: float | None = None   # time.monotonic() deadline; None = never
    loaded_wall: float = field(default_factory=time.time)

    def expiry_wall(self) -> datetime:
        if self.expires_at is None:
            return datetime(2318, 1, 1, tzinfo=timezone.utc)  # Ollama's convention for "forever"
        return datetime.fromtimestamp(time.time() + (self.expires_at - time.monotonic()), tz=timezone.utc)


def normalize_name(name: str) -> str:
    """Canonical short name: "SmolLM2:latest" and "library/smollm2" are "smollm2" (store naming rules)."""
    name = name.strip()
    try:
        from ..store import parse_name
        return parse_name(name).short
    except LlamaforgeError:
        return name


class ModelManager:
    """Loads models (at start, or on demand by store name), hands out entries, unloads idle ones."""

    def __init__(self, config: ServerConfig, metrics: Metrics, loader: Callable | None = None,
                 preloaded: dict[str, Any] | None = None):
        self.config, self.metrics = config, metrics
        self._loader = loader
        self.entries: dict[str, ModelEntry] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._lock = threading.Lock()
        self.preload_error: str | None = None
        self.preloading = bool(config.models)
        for name, lm in (preloaded or {}).items():
            self._add(name, lm, 0.0, pinned=True)

    # -- loading --------------------------------------------------------------------------------------------------
    def _load(self, name: str):
        if self._loader is not None:
            return self._loader(name)
        from ..api import load
        kw = {k: v for k, v in (("dtype", self.config.dtype), ("quant", self.config.quant)) if v is not None}
        return load(name, **kw)

    def _add(self, name: str, lm, seconds: float, pinned: bool) -> ModelEntry:
        sched = Scheduler(lm, max_batch=self.config.max_batch, max_queue=self.config.max_queue,
                          max_seq_len=self._ctx_for(lm), metrics=self.metrics, name=name)
        entry = ModelEntry(name, lm, sched, seconds, pinned)
        with self._lock:
            self.entries[name] = entry
        return entry

    def _ctx_for(self, lm) -> int | None:
        if self.config.ctx is None:
            return None
        from ..generate.engine import context_length
        return max(2, min(int(self.config.ctx), context_length(lm)))

    def preload(self) -> None:
        """Load the models named at start (blocking; run in a thread). /health is 503 until this returns."""
        try:
            for name in self.config.models:
                t0 = time.perf_counter()
                lm = self._load(name)
                self._add(self._entry_name(name, lm), lm, time.perf_counter() - t0, pinned=True)
                log.info("loaded %s in %.1fs", name, time.perf_counter() - t0)
        except Exception as e:  # reported by /health; the server keeps answering
            log.exception("failed to load a model")
            self.preload_error = f"{type(e).__name__}: {e}"
        finally:
            self.preloading = False

    @staticmethod
    def _entry_name(requested: str, lm) -> str:
        # A path given on the command line is served under the model's own name (its file stem).
        if os.path.exists(requested) and getattr(lm, "name", None):
            return str(lm.name)
        return normalize_name(requested)

    def find(self, name: str) -> ModelEntry | None:
        key = normalize_name(name)
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = next((e for e in self.entries.values()
                              if normalize_name(str(getattr(e.lm, "name", None) or "")) == key), None)
        return entry

    async def get(self, name: str, keep_alive: float | None = None) -> ModelEntry:
        """The entry for `name`, loading it on demand; ApiError 404 for unknown models."""
        if not isinstance(name, str) or not name.strip():
            raise ApiError(400, "missing 'model'", param="model", code="model_not_found")
        entry = self.find(name)
        key = normalize_name(name)
        if entry is None:
            if self.preloading and key in {normalize_name(m) for m in self.config.models}:
                raise ApiError(503, f"model {key!r} is still loading", code="model_loading",
                               headers={"Retry-After": "2"})
            entry = await self._load_on_demand(key)
        self.touch(entry, keep_alive)
        return entry

    async def _load_on_demand(self, key: str) -> ModelEntry:
        known = ", ".join(sorted(self.entries)) or "none"
        if not self.config.load_on_demand:
            raise ApiError(404, f"model {key!r} not found (loaded: {known})", param="model",
                           code="model_not_found")
        fut = self._loading.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._loading[key] = fut
            try:
                entry = await self._do_load(key)
                fut.set_result(entry)
            except BaseException as e:
                fut.set_exception(e)
                fut.exception()  # mark retrieved: other waiters re-raise it themselves
            finally:
                self._loading.pop(key, None)
        return await asyncio.shield(fut)

    async def _do_load(self, key: str) -> ModelEntry:
        from ..store import Store
        try:
            ref = await asyncio.to_thread(Store().resolve, key)
        except ModelNotFoundError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        except LlamaforgeError as e:
            raise ApiError(400, str(e), param="model", code="invalid_model") from None
        if ref.name is None:
            # Requests may only name store models: a remote client must not make the server open files.
            raise ApiError(404, f"model {key!r} not found in the store", param="model", code="model_not_found")
        self._evict_for_one_more()
        t0 = time.perf_counter()
        try:
            lm = await asyncio.to_thread(self._load, key)
        except ModelNotFoundError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        except LlamaforgeError as e:
            raise ApiError(500, f"failed to load model {key!r}: {e}", code="model_load_failed") from None
        return self._add(key, lm, time.perf_counter() - t0, pinned=False)

    def _evict_for_one_more(self) -> None:
        with self._lock:
            if len(self.entries) < self.config.max_loaded:
                return
            idle = [e for e in self.entries.values() if not e.pinned and not e.scheduler.busy]
        if not idle:
            raise ApiError(503, f"{len(self.entries)} models are loaded and busy (--max-loaded "
                                f"{self.config.max_loaded}); retry later", code="too_many_models",
                           headers={"Retry-After": "5"})
        self.unload(min(idle, key=lambda e: e.scheduler.last_used).name)

    def touch(self, entry: ModelEntry, keep_alive: float | None) -> None:
        if entry.pinned:
            return
        ka = self.config.keep_alive if keep_alive is None else keep_alive
        entry.expires_at = None if ka < 0 else time.monotonic() + ka

    def unload(self, name: str) -> bool:
        with self._lock:
            entry = self.entries.pop(name, None)
        if entry is None:
            return False
        entry.scheduler.shutdown()
        log.info("unloaded %s", name)
        return True

    def reap(self) -> None:
        """Unload on-demand models whose keep_alive ran out and that have nothing in flight."""
        now = time.monotonic()
        with self._lock:
            due = [e.name for e in self.entries.values()
                   if e.expires_at is not None and now >= e.expires_at and not e.scheduler.busy]
        for name in due:
            self.unload(name)

    def gauges(self) -> dict[str, dict[str, int]]:
        with self._lock:
            entries = list(self.entries.values())
        return {e.name: e.scheduler.stats() for e in entries}

    def shutdown(self) -> None:
        with self._lock:
            entries = list(self.entries.values())
        for e in entries:
            e.scheduler.shutdown()


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

    from .ollama_routes import router as ollama_router
    from .openai_routes import router as openai_router
    app.include_router(openai_router)
    app.include_router(ollama_router)
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
            self.metrics.requests.inc(route=route, status=str(status["code"]))
            self.metrics.latency.observe(time.perf_counter() - t0, route=route)


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
        async def shutdown(self, sockets=None):
            app.state.server.begin_shutdown()
            await super().shutdown(sockets=sockets)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after shutting down; a graceful stop is a clean exit (status 0).
            self._captured_signals.clear()

    cfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout,
                         lifespan="on", access_log=False)
    return _Server(cfg)
