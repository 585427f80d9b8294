"""One background thread per model drives `BatchEngine.step()`; asyncio handlers talk to it through streams.

- `submit()` (event-loop thread) validates and queues a request in the engine right away, so bad parameters and
  over-long prompts fail before any HTTP response starts; a full queue raises `QueueFullError` (-> 503).
- The worker thread steps the engine while it has work; between steps requests join (the engine admits queued
  ones into free rows) and leave (finished or cancelled). Events go back to each request's `asyncio.Queue` with
  `loop.call_soon_threadsafe`, one call per loop per step.
- `cancel()` (client went away) frees the row before the next step: the engine drops it at once when idle, or
  right after the step in flight.
- `run_job(fn)` runs other model work (embeddings, prompt scoring) on the same thread, between steps, so one
  thread owns the model and nothing fights over the two cores.
- `shutdown()` ends every open stream with a final event (finish_reason "shutdown") and stops the thread.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..generate.engine import BatchEngine, TokenEvent
from ..generate.sampling import SamplingParams

log = logging.getLogger("llamaforge.server")

SHUTDOWN = "shutdown"   # finish_reason of the final event sent to open streams on shutdown
ERROR = "error"         # finish_reason when the engine failed; the event's text carries the message


class QueueFullError(Exception):
    """The waiting queue is full (-> HTTP 503 with Retry-After)."""


class ShuttingDownError(Exception):
    """The server is stopping and accepts no new work (-> HTTP 503)."""


@dataclass(eq=False)
class Stream:
    """The asyncio side of one generation request: events arrive on `queue` as (index, TokenEvent).

    Several requests (OpenAI `n` > 1, prompt lists) may share one queue; `index` tells them apart.
    """

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int = 0
    request: Any = None            # the engine Request
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    finished: bool = False
    first_step: int | None = None   # scheduler step that produced the first event (debugging / tests)
    cancel_step: int | None = None  # steps completed when the client went away


class Scheduler:
    """Continuous batching for one loaded model."""

    def __init__(self, lm, *, max_batch: int = 4, max_queue: int = 64, max_seq_len: int | None = None,
                 metrics=None, name: str | None = None,
                 engine_factory: Callable[..., BatchEngine] = BatchEngine):
        self.lm = lm
        self.name = name or lm.name or "model"
        self.max_batch, self.max_queue, self.max_seq_len = max_batch, max_queue, max_seq_len
        self.metrics = metrics
        self._engine_factory = engine_factory
        self.engine = engine_factory(lm, max_batch=max_batch, max_seq_len=max_seq_len)
        self._live: set = set()                      # engine Requests not yet finished
        self._jobs: list[tuple[Callable, concurrent.futures.Future]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{self.name}", daemon=True)
        self.steps = 0
        self.recent: collections.deque = collections.deque(maxlen=32)  # finished streams, for /debug/scheduler
        self.last_used = time.monotonic()
        self._thread.start()

    # -- facts ----------------------------------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.engine.max_seq_len

    @property
    def active(self) -> int:
        return self.engine.active

    @property
    def queued(self) -> int:
        return self.engine.queued

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._live or self._jobs)

    def stats(self) -> dict[str, int]:
        cache = getattr(self.engine, "prefix_cache", None)  # (an engine without one: test doubles)
        pc = cache.stats() if cache is not None else {"bytes": 0, "blocks": 0, "hit_rate": 0.0, "hit_tokens": 0,
                                                      "lookup_tokens": 0}
        return {"active": self.active, "queued": self.queued, "max_batch": self.max_batch,
                "max_queue": self.max_queue, "steps": self.steps, "context_length": self.context_length,
                "prefix_cache_bytes": pc["bytes"], "prefix_cache_blocks": pc["blocks"],
                "prefix_cache_hit_rate": pc["hit_rate"], "prefix_cache_hit_tokens": pc["hit_tokens"],
                "prefix_cache_lookup_tokens": pc["lookup_tokens"], **_speculation_stats(self.engine)}

    def debug(self) -> dict:
        return dict(self.stats(), recent=list(self.recent))

    # -- event-loop side ------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, stream: Stream,
               logits_processors: Iterable | None = None) -> Any:
        """Queue one request; raises InvalidRequestError / ContextLengthError / QueueFullError / ShuttingDownError."""
        if self._stopping:
            raise ShuttingDownError("the server is shutting down")
        # A newcomer waits in the engine's queue until the next step even when a row is free, so free rows
        # count as extra room: max_queue bounds the requests that must wait for someone else to finish.
        if self.engine.queued >= self.max_queue + max(0, self.max_batch - self.engine.active):
            if self.metrics:
                self.metrics.rejected.inc(model=self.name)
            raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
        with self._lock:  # the worker cannot finish `req` and drop it from _live before it is in there
            req = self.engine.add(prompt_ids, params, logits_processors, user_data=stream)
            stream.request = req
            self._live.add(req)
        self.last_used = time.monotonic()
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(req.prompt_ids), model=self.name)
        self._wake.set()
        return req

    def cancel(self, stream: Stream) -> None:
        """The client is gone: drop its request (row freed before the next step)."""
        req = stream.request
        if req is None or stream.finished:
            return
        stream.finished = True
        stream.cancel_step = self.steps
        self._remember(stream, "cancelled")
        was_running = not req.done
        self.engine.cancel(req)
        with self._lock:
            self._live.discard(req)
        if self.metrics and was_running:
            self.metrics.cancelled.inc(model=self.name)
        self._wake.set()

    def run_job(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` on the model thread between steps; await with `asyncio.wrap_future`."""
        if self._stopping:
            raise ShuttingDownError("the server is shutting down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._jobs.append((fn, fut))
        self.last_used = time.monotonic()
        self._wake.set()
        return fut

    def shutdown(self, timeout: float = 10.0, reason: str = "the server is shutting down") -> None:
        """Stop accepting work, end open streams with a final "shutdown" event whose text says why (`reason`),
        stop the thread."""
        self._stop_reason = reason
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # -- worker thread --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._stopping:
                self._end_all(SHUTDOWN, getattr(self, "_stop_reason", "the server is shutting down"))
                return
            try:
                self._iteration()
            except Exception:  # keep the model thread alive whatever happens; requests see an error event
                log.exception("scheduler iteration failed")
                self._end_all(ERROR, "internal scheduler error")

    def _iteration(self) -> None:
        job = None
        with self._lock:
            if self._jobs:
                job = self._jobs.pop(0)
        if job is not None:
            fn, fut = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the awaiting handler
                    fut.set_exception(e)
        if self.engine.has_work():
            self._step()
        elif job is None:
            self._wake.wait(0.5)
            self._wake.clear()

    def _step(self) -> None:
        try:
            batch = self.engine.active + min(self.engine.queued, self.max_batch - self.engine.active)
            events = self.engine.step()
        except Exception as e:  # a bug or OOM inside the model must not kill the server
            log.exception("engine step failed; failing its requests and starting a fresh engine")
            # The fresh engine is in place before anyone hears of the failure: a client that retries at once
            # must reach it, not the broken engine that is about to be dropped.
            fresh = self._engine_factory(self.lm, max_batch=self.max_batch, max_seq_len=self.max_seq_len)
            self._end_all(ERROR, f"generation failed: {type(e).__name__}: {e}", replace_engine=fresh)
            return
        self.steps += 1
        if self.metrics and batch:
            self.metrics.batch_size.observe(batch, model=self.name)
        self._dispatch(events)

    def _dispatch(self, events: list[tuple[Any, TokenEvent]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        now = time.perf_counter()
        generated = 0
        for req, ev in events:
            stream: Stream = req.user_data
            if stream is None or stream.finished:
                continue
            generated += 1
            if stream.t_first is None:
                stream.t_first, stream.first_step = now, self.steps
                if self.metrics:
                    self.metrics.ttft.observe(now - stream.t_submit, model=self.name)
                    if getattr(req, "cached_tokens", 0):
                        self.metrics.cached_tokens.inc(req.cached_tokens, model=self.name)
            if ev.finish_reason is not None:
                stream.finished = True
                self._remember(stream, ev.finish_reason)
                with self._lock:
                    self._live.discard(req)
            by_loop.setdefault(stream.loop, []).append((stream.queue, (stream.index, ev)))
        if self.metrics and generated:
            self.metrics.generated_tokens.inc(generated, model=self.name)
        for loop, items in by_loop.items():
            _post(loop, items)

    def _remember(self, stream: Stream, outcome: str) -> None:
        req = stream.request
        self.recent.append({"request": getattr(req, "id", None), "outcome": outcome,
                            "first_step": stream.first_step, "cancel_step": stream.cancel_step,
                            "tokens": getattr(req, "completion_tokens", 0)})

    def _end_all(self, reason: str, message: str, replace_engine: Any = None) -> None:
        with self._lock:  # submit() adds under this lock: a request is either ended here or on the new engine
            engine = self.engine
            if replace_engine is not None:
                self.engine = replace_engine
            live, self._live = list(self._live), set()
            jobs, self._jobs = self._jobs, []
        by_loop: dict = {}
        for req in live:
            engine.cancel(req)
            stream: Stream = req.user_data
            if stream is None or stream.finished:
                continue
            stream.finished = True
            by_loop.setdefault(stream.loop, []).append(
                (stream.queue, (stream.index, TokenEvent(-1, message, 0.0, None, reason))))
        for loop, items in by_loop.items():
            _post(loop, items)
        for _, fut in jobs:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ShuttingDownError("the server is shutting down") if reason == SHUTDOWN
                                  else RuntimeError(message))


def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
    def deliver():
        for q, item in items:
            q.put_nowait(item)
    try:
        loop.call_soon_threadsafe(deliver)
    except RuntimeError:
        pass  # the loop is closed: nobody is listening any more


def _speculation_stats(engine) -> dict:
    """Draft tokens proposed / accepted by the engine's speculative decoding (zeros when it is off)."""
    spec = getattr(engine, "speculator", None)
    st = spec.stats() if spec is not None else {}
    return {"speculative_drafted_tokens": st.get("drafted_tokens", 0),
            "speculative_accepted_tokens": st.get("accepted_tokens", 0),
            "speculative_acceptance_rate": st.get("acceptance_rate", 0.0)}
