"""Loaded models: `ModelManager` loads them (at start, or on demand by store name), hands out entries with their
scheduler, and unloads idle ones (Ollama's keep_alive)."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from ..errors import (LlamaforgeError, ModelFormatError, ModelNotFoundError, StoreError, TemplateError,
                      TokenizerError)
from .metrics import Metrics
from .scheduler import Scheduler
from .schemas import ApiError

log = logging.getLogger("llamaforge.server")
UNLOAD_GRACE_S = 30.0   # keep_alive 0: the most a request's model may outlive it if its route could not release it


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


def display_name(name: str) -> str:
    """The one name form shown in /api/tags, /api/ps and /api/show: with its tag (`smollm2:latest`)."""
    try:
        from ..store import parse_name
        return str(parse_name(name.strip()))
    except LlamaforgeError:
        return name


def normalize_name(name: str) -> str:
    """Canonical short name: "SmolLM2:latest" and "library/smollm2" are "smollm2" (store naming rules)."""
    name = name.strip()
    try:
        from ..store import parse_name
        return parse_name(name).short
    except LlamaforgeError:
        return name


def _store_relative(e: LlamaforgeError) -> str:
    """The reason without the server's file-system layout (a blob path says where the store lives)."""
    reason = getattr(e, "reason", None)
    return reason if reason else str(e)


class ModelManager:
    """Loads models (at start, or on demand by store name), hands out entries, unloads idle ones.
    `config` is the server's `app.ServerConfig`."""

    def __init__(self, config, metrics: Metrics, loader: Callable | None = None,
                 preloaded: dict[str, Any] | None = None):
        self.config, self.metrics = config, metrics
        self._loader = loader
        self.entries: dict[str, ModelEntry] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._lock = threading.Lock()
        self.preload_error: str | None = None
        self.on_fatal: Callable[[str], None] | None = None   # set by make_server when loading must succeed
        self.preloading = bool(config.models)
        for name, lm in (preloaded or {}).items():
            self._add(name, lm, 0.0, pinned=True)

    # -- loading --------------------------------------------------------------------------------------------------
    def _load(self, name: str):
        if self._loader is not None:
            return self._speculate(self._loader(name))
        from ..api import load
        kw = {k: v for k, v in (("dtype", self.config.dtype), ("quant", self.config.quant),
                                ("threads", self.config.threads)) if v is not None}
        return self._speculate(load(name, **kw))

    def _speculate(self, lm):
        """serve --speculate / --draft: every engine of `lm` drafts and verifies (output unchanged); a model whose
        tokenizer differs from the draft's fails to load with the reason."""
        c = self.config
        mode, draft = getattr(c, "speculate", None), getattr(c, "draft", None)
        if mode in (None, "off") and draft is None:
            return lm
        from ..generate.speculative import configure
        draft_lm = None
        if draft is not None and mode in (None, "draft"):
            with self._lock:
                draft_lm = getattr(self, "_draft_lm", None)
            if draft_lm is None:
                from ..api import load
                draft_lm = load(draft, **{k: v for k, v in (("dtype", c.dtype), ("quant", c.quant)) if v is not None},
                                compile=False)
                with self._lock:
                    self._draft_lm = draft_lm
        configure(lm, mode or "draft", getattr(c, "draft_tokens", None), draft_lm)
        return lm

    def _add(self, name: str, lm, seconds: float, pinned: bool) -> ModelEntry:
        sched = Scheduler(lm, max_batch=self.config.max_batch, max_queue=self.config.max_queue,
                          max_seq_len=self._ctx_for(lm), metrics=self.metrics, name=name)
        entry = ModelEntry(name, lm, sched, seconds, pinned)
        with self._lock:
            self.entries[name] = entry
        return entry

    def _ctx_for(self, lm) -> int | None:
        """KV rows per request: the model's own num_ctx (Modelfile PARAMETER) wins over the server's --ctx,
        as a model's num_ctx wins over OLLAMA_CONTEXT_LENGTH in Ollama."""
        from ..generate.engine import context_length, model_options
        if model_options(lm).get("num_ctx"):
            return max(2, context_length(lm))
        if self.config.ctx is None:
            return None
        return max(2, min(int(self.config.ctx), context_length(lm)))

    def preload(self) -> None:
        """Load the models named at start (blocking; run in a thread). /health is 503 until this returns."""
        try:
            for name in self.config.models:
                t0 = time.perf_counter()
                lm = self._load(name)
                self._add(self._entry_name(name, lm), lm, time.perf_counter() - t0, pinned=True)
                log.info("loaded %s in %.1fs", name, time.perf_counter() - t0)
        except LlamaforgeError as e:  # a bad file or name: one clear line, no traceback
            self.preload_error = f"failed to load {name}: {e}"
            log.error("%s", self.preload_error)
        except Exception as e:  # a bug: keep the traceback for the log
            log.exception("failed to load %s", name)
            self.preload_error = f"failed to load {name}: {type(e).__name__}: {e}"
        finally:
            self.preloading = False
        if self.preload_error and self.on_fatal is not None:
            self.on_fatal(self.preload_error)  # `llamaforge serve`: exit with the error rather than serve nothing

    @staticmethod
    def _entry_name(requested: str, lm) -> str:
        """A store name is served under its short form; a path given on the command line under a clean name
        made from its file name (`SmolLM2-135M.Q4_1.gguf` -> `smollm2-135m.q4_1`), never the path itself."""
        if getattr(lm, "name", None):
            return normalize_name(str(lm.name))
        if os.path.exists(requested):
            from ..store import default_name_for
            return default_name_for(requested)
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
        from ..store import Store, parse_name
        # Requests may only name store models, and the name is checked as a name before anything touches the
        # disk: a string that is not a valid store name (a path, "~/...", "../") is "not found" in the very
        # words a missing model gets, so no answer depends on which files exist on this machine.
        try:
            name = parse_name(key)
        except StoreError:
            raise ApiError(404, str(ModelNotFoundError(key, [])), param="model", code="model_not_found") from None
        try:
            ref = await asyncio.to_thread(Store().resolve, name)  # a ModelName is looked up in the store only
        except ModelNotFoundError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        except LlamaforgeError as e:
            raise ApiError(400, str(e), param="model", code="invalid_model") from None
        self._evict_for_one_more()
        t0 = time.perf_counter()
        try:
            lm = await asyncio.to_thread(self._load, key if self._loader is not None else ref)
        except ModelNotFoundError as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        except (ModelFormatError, TokenizerError, TemplateError) as e:
            # The stored file itself is malformed or crafted: the request named something we cannot serve.
            raise ApiError(400, f"cannot load model {key!r}: {_store_relative(e)}", param="model",
                           code="invalid_model") from None
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
        # keep_alive 0: unloaded by `release` as soon as this request is done; the grace only keeps the reaper
        # from taking the model away while the request is still being planned.
        entry.expires_at = None if ka < 0 else time.monotonic() + (ka or UNLOAD_GRACE_S)

    async def release(self, entry: ModelEntry, keep_alive: float | None) -> bool:
        """A request is done with `entry`: with keep_alive 0 (Ollama's "unload after this request") the model is
        unloaded now unless other requests still use it (the reaper then takes it when they finish)."""
        if keep_alive is None or keep_alive != 0 or entry.pinned or entry.scheduler.busy:
            if keep_alive == 0 and not entry.pinned:
                entry.expires_at = time.monotonic()
            return False
        with self._lock:
            current = self.entries.get(entry.name) is entry
        return current and await asyncio.to_thread(self.unload, entry.name)

    def unload(self, name: str, reason: str | None = None) -> bool:
        with self._lock:
            entry = self.entries.pop(name, None)
        if entry is None:
            return False
        entry.scheduler.shutdown(reason=reason or f"model {name!r} was unloaded")
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
