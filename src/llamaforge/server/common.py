"""Helpers shared by the OpenAI and Ollama route modules: body parsing, JSON/streaming responses that notice a
client going away, and running generation requests through a model's scheduler."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ContextLengthError, InvalidRequestError
from .scheduler import ERROR, SHUTDOWN, QueueFullError, ShuttingDownError, Stream
from .schemas import ApiError, parse_body
from .security import _BodyTooLarge

RETRY_AFTER_S = 1


def dumps(obj: Any) -> bytes:
    """Compact JSON; falls back to ASCII escapes if some echoed input holds a lone surrogate."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def json_response(obj: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(obj), status_code=status, headers=headers, media_type="application/json")


def error_payload(path: str, err: ApiError) -> dict:
    if path.startswith("/api/"):
        return {"error": err.message}
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(path: str, err: ApiError) -> Response:
    return json_response(error_payload(path, err), err.status, err.headers)


async def read_json(request: Request, schema):
    """Read the body (size-limited by the middleware) and validate it against `schema` (ApiError on failure)."""
    try:
        raw = await request.body()
    except _BodyTooLarge:
        raise ApiError(413, "request body is too large", code="body_too_large") from None
    return parse_body(raw, schema)


def api_error_from(e: Exception) -> ApiError:
    """Map engine/scheduler exceptions to HTTP errors."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param=e.field or "messages", code="context_length_exceeded")
    if isinstance(e, InvalidRequestError):
        return ApiError(400, str(e), param=e.field)
    if isinstance(e, QueueFullError):
        return ApiError(503, str(e), code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ShuttingDownError):
        return ApiError(503, str(e), code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})
    raise e


# ------------------------------------------------------------------------------------------ disconnect-aware
async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, coro, on_disconnect: Callable[[], None]):
    """Await `coro`; if the client disconnects first, cancel it, call `on_disconnect` and raise ClientGone."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        on_disconnect()
        raise ClientGone()
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()


class ClientGone(Exception):
    """The client disconnected; nothing more is sent."""


class StreamingEvents(Response):
    """Streams chunks from an async iterator; a client disconnect (noticed at once, even while the request is
    still queued or prefilling) cancels the iterator and calls `on_close`, which frees the batch slots."""

    def __init__(self, chunks: AsyncIterator[bytes], media_type: str, on_close: Callable[[], None],
                 headers: dict | None = None):
        super().__init__(content=None, status_code=200, headers=headers, media_type=media_type)
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]  # length unknown
        self.chunks, self.on_close = chunks, on_close

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

        async def produce():
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        work = asyncio.ensure_future(produce())
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                work.result()  # re-raise a send error
        except OSError:
            pass  # the socket went away mid-send: same as a disconnect
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                try:
                    await work
                except BaseException:
                    pass
            self.on_close()
            await _aclose(self.chunks)


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except BaseException:
            pass


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class Choice:
    """What one generation produced so far."""

    index: int
    stream: Stream
    group: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list | None]] = field(default_factory=list)  # (id, logprob, top)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.stream.request.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.stream.request.completion_tokens

    def add(self, ev) -> str:
        """Record an event; return its text delta."""
        if ev.finish_reason in (SHUTDOWN, ERROR):
            self.finish_reason = ev.finish_reason
            if ev.finish_reason == ERROR:
                self.error = ev.text
            return ""
        self.text += ev.text
        if not (ev.finish_reason == "stop" and ev.id in self.stream.request.stop_ids):
            self.token_ids.append(ev.id)
        self.logprobs.append((ev.id, ev.logprob, ev.top_logprobs))
        self.finish_reason = ev.finish_reason
        return ev.text


class Generation:
    """One HTTP request's generations (n choices x prompts) sharing one event queue."""

    def __init__(self, entry, t_start: float | None = None):
        self.entry = entry
        self.scheduler = entry.scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.t_start = t_start or time.perf_counter()

    def submit(self, prompt_ids: list[int], params, processors=None, group: int = 0) -> Choice:
        """Queue one generation; `group` identifies its prompt (for usage counts)."""
        stream = Stream(self.loop, self.queue, index=len(self.choices))
        try:
            self.scheduler.submit(prompt_ids, params, stream, processors)
        except Exception as e:
            self.cancel()
            raise api_error_from(e) from None
        choice = Choice(stream.index, stream, group=group)
        self.choices.append(choice)
        return choice

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                self.scheduler.cancel(c.stream)

    async def events(self) -> AsyncIterator[tuple[Choice, Any, str]]:
        """Yield (choice, event, text delta) until every choice has finished."""
        while not self.done:
            index, ev = await self.queue.get()
            choice = self.choices[index]
            delta = choice.add(ev)
            yield choice, ev, delta

    async def run_to_end(self) -> None:
        async for _ in self.events():
            pass

    def usage(self) -> dict[str, int]:
        # A prompt counts once however many choices (OpenAI `n`) were sampled from it.
        groups = {}
        for c in self.choices:
            groups.setdefault(c.group, c.prompt_tokens)
        p = sum(groups.values())
        comp = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": p, "completion_tokens": comp, "total_tokens": p + comp}

    def first_error(self) -> str | None:
        return next((c.error for c in self.choices if c.error), None)
