"""Helpers shared by the OpenAI and Ollama route modules: body parsing, JSON/streaming responses that notice a
client going away, and running generation requests through a model's scheduler."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from ..errors import ContextLengthError, InvalidRequestError, LlamaforgeError, TemplateError, TokenizerError
from ..generate.engine import TokenEvent
from ..generate.request import GenerationRequest
from ..generate.stage import Delta
from .scheduler import ERROR, SHUTDOWN, QueueFullError, ShuttingDownError, Stream
from .schemas import ApiError, parse_body
from .security import _BodyTooLarge
from .._fs import loads_json

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
    if isinstance(e, (TemplateError, TokenizerError)):
        return ApiError(400, str(e), param="messages" if isinstance(e, TemplateError) else "prompt")
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
class Choice:
    """One choice of a request: its stream in the scheduler, its own output stages, what it produced so far."""

    def __init__(self, index: int, stream: Stream | None, output, prompt_tokens: int, group: int = 0):
        self.index, self.stream, self.output, self.group = index, stream, output, group
        self.prompt_tokens = prompt_tokens
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[tuple[int, float, list | None]] = []  # (id, logprob, top)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.result = None   # generate.stage.Result once finished

    @property
    def completion_tokens(self) -> int:
        return self.stream.request.completion_tokens if self.stream is not None else 0

    @property
    def request(self):
        return self.stream.request if self.stream is not None else None

    def add(self, ev) -> list:
        """Record an engine event; return the deltas (generate.stage.Delta) the client should see now."""
        if ev.finish_reason in (SHUTDOWN, ERROR):
            # Cut short: the stream says so (an error naming why), never a normal-looking "stop".
            self.finish_reason = ev.finish_reason
            self.error = ev.text or ("the answer was cut short" if ev.finish_reason == SHUTDOWN else "error")
            return []
        if self.stream is None:  # a refused request: its answer is the stage's refusal text
            deltas = [Delta(ev.text)] if ev.text else []
            _, self.result = self.output.finish(ev.finish_reason)
            self.result.text, self.result.finish_reason = ev.text, ev.finish_reason
        else:
            req = self.stream.request
            if not (ev.finish_reason == "stop" and ev.id in req.stop_ids):
                self.token_ids.append(ev.id)
            self.logprobs.append((ev.id, ev.logprob, ev.top_logprobs))
            deltas = self.output.feed(ev.text)
            withheld = ev.finish_reason is None and getattr(self.output, "stopped", False)  # output guard
            if ev.finish_reason is not None or withheld:
                tail, self.result = self.output.finish(ev.finish_reason or "stop")
                deltas = deltas + tail
                if withheld:
                    self.finish_reason = self.result.finish_reason
        self.text += "".join(d.text for d in deltas)
        if ev.finish_reason is not None:
            self.finish_reason = self.result.finish_reason
        return deltas


class Generation:
    """One HTTP request's generations (n choices x prompts) sharing one event queue."""

    def __init__(self, entry, t_start: float | None = None):
        self.entry = entry
        self.scheduler = entry.scheduler
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.t_start = t_start or time.perf_counter()

    def submit(self, plan, group: int = 0) -> list[Choice]:
        """Queue the plan's `n` choices (`group` identifies its prompt, for usage counts). A refused plan runs
        nothing: each choice gets the refusal as its whole answer."""
        out = []
        for i in range(plan.request.n):
            index = len(self.choices)
            if plan.refusal is not None:
                choice = Choice(index, None, plan.output(), len(plan.prompt_ids), group)
                r = plan.refusal
                self.queue.put_nowait((index, TokenEvent(-1, r.text, 0.0, None, r.reason)))
            else:
                stream = Stream(self.loop, self.queue, index=index)
                try:
                    self.scheduler.submit(plan.prompt_ids, plan.params_for(i), stream, plan.processors())
                except Exception as e:
                    self.cancel()
                    raise api_error_from(e) from None
                choice = Choice(index, stream, plan.output(), len(plan.prompt_ids), group)
            self.choices.append(choice)
            out.append(choice)
        return out

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish_reason is None and c.stream is not None:
                self.scheduler.cancel(c.stream)

    async def events(self) -> AsyncIterator[tuple[Choice, Any, list]]:
        """Yield (choice, engine event, deltas) until every choice has finished."""
        while not self.done:
            index, ev = await self.queue.get()
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue  # a late event of a choice an output guard already ended
            deltas = choice.add(ev)
            if choice.finish_reason is not None and ev.finish_reason is None:  # ended by an output guard
                self.scheduler.cancel(choice.stream)
                ev = ev._replace(finish_reason=choice.finish_reason)
            yield choice, ev, deltas

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

    def cached_tokens(self) -> int:
        """Prompt tokens whose keys/values were reused from earlier requests (each prompt counted once)."""
        groups = {}
        for c in self.choices:
            if c.request is not None:
                groups.setdefault(c.group, c.request.cached_tokens)
        return sum(groups.values())

    def first_error(self) -> str | None:
        """The message of a choice that failed (engine error); a choice cut by shutdown is not a failure."""
        return next((c.error for c in self.choices if c.error and c.finish_reason == ERROR), None)


async def plan_request(entry, request: GenerationRequest):
    """The seam, off the event loop (tokenizing a long prompt or rendering a template takes time), with the
    request's window set to the engine's rows. Errors become ApiErrors naming the caller's field."""
    from ..generate.pipeline import plan
    try:
        return await asyncio.to_thread(plan, entry.lm, request, context_length=entry.scheduler.context_length)
    except (LlamaforgeError, ApiError) as e:
        raise api_error_from(e) from None


def token_text(tokenizer, token_id: int) -> str:
    """Display text of one token (control tokens by name)."""
    if tokenizer.is_special(token_id):
        return tokenizer.id_to_piece(token_id)
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


def tool_arguments(call: dict) -> dict:
    """The arguments of an OpenAI-shaped tool call as an object (Ollama's shape)."""
    try:
        args = loads_json(call.get("function", {}).get("arguments") or "{}")
    except ValueError:
        args = {}
    return args if isinstance(args, dict) else {"value": args}


def log_fields(request, **fields) -> None:
    """Facts for the request's log line (server/app.py `_log_request`): model, generation, user."""
    state = request.scope.setdefault("state", {})
    state.setdefault("llamaforge", {}).update({k: v for k, v in fields.items() if v is not None})
