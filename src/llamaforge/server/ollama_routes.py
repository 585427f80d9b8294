"""The Ollama dialect's generation routes: /api/generate, /api/chat (NDJSON streams), /api/embed, /api/embeddings.
Model administration (/api/tags, /api/show, ...) lives in `ollama_admin.py`.

Translation only: wire JSON -> `GenerationRequest` (the seam validates and plans it), seam output -> wire JSON.
Shapes follow Ollama's API docs: streams are one JSON object per line; the last has `done: true`, `done_reason`
and durations in nanoseconds. Errors are {"error": "message"}; a field is named as the caller spelled it
(`options.temperature`). Every request field of the official client is mapped here or refused by name.
"""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from fastapi import APIRouter
from starlette.requests import Request

from ..errors import LlamaforgeError
from ..generate.embed import check_dimensions, embed_ids, tokenize_inputs
from ..generate.request import Constraint, GenerationRequest, Guards, Retrieval, Tool
from .models import display_name
from .common import (ClientGone, Generation, StreamingEvents, api_error_from, dumps, json_response, log_fields,
                     plan_request, read_json, token_text, tool_arguments, until_disconnect)
from .scheduler import ERROR, SHUTDOWN
from .schemas import (MAX_TOP_LOGPROBS_CHAT, ApiError, OllamaChatRequest, OllamaEmbedRequest,
                      OllamaGenerateRequest, OllamaLegacyEmbeddingsRequest, OllamaOptions, bad_request, check_int,
                      check_role, parse_keep_alive)

router = APIRouter()

# Ollama's sampling defaults (applied under the model's own defaults and the request's options).
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1,
                   "repeat_last_n": 64}
# Options mapped onto SamplingParams (Ollama name -> ours); num_ctx sets the request's window.
_OPTION_FIELDS = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                  "min_p": "min_p", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
                  "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                  "seed": "seed", "stop": "stop"}
_FIELDS = {ours: f"options.{theirs}" for theirs, ours in _OPTION_FIELDS.items()}


def _state(request: Request):
    return request.app.state.server


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


# ------------------------------------------------------------------------------------------- translation in
def _options(o: OllamaOptions | None) -> tuple[dict, int | None]:
    """(SamplingParams options, num_ctx). Options this server does not have are refused by name."""
    o = o or OllamaOptions()
    given = o.model_dump(exclude_none=True)
    for name in given:
        if name not in _OPTION_FIELDS and name != "num_ctx":
            raise bad_request(f"'options.{name}' is not supported by this server", f"options.{name}",
                              code="unsupported_field")
    opts = {_OPTION_FIELDS[k]: v for k, v in given.items() if k in _OPTION_FIELDS}
    if opts.get("max_tokens") in (-1, -2):
        opts["max_tokens"] = None  # Ollama: -1 = no limit, -2 = fill the context; the window bounds us
    if isinstance(opts.get("stop"), str):
        opts["stop"] = (opts["stop"],)
    if "stop" in opts:
        opts["stop"] = tuple(s for s in opts["stop"] if s)
    num_ctx = check_int(o.num_ctx, "options.num_ctx", 1)
    return opts, num_ctx


def _constraint(fmt) -> Constraint | None:
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return Constraint("json")
    if isinstance(fmt, dict):
        return Constraint("json_schema", schema=fmt, strict=True)
    raise bad_request(f"unsupported format {fmt!r}; use \"json\" or a JSON schema object", "format")


def _logprobs_n(logprobs: bool, top: int | None) -> int | None:
    check_int(top, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)
    return (top or 0) if logprobs else None


def _common(st, req, messages=None, prompt=None) -> GenerationRequest:
    if req.think not in (None, False):
        raise bad_request("'think' (reasoning traces) is not supported by this model server", "think",
                          code="unsupported_field")
    opts, _ = _options(req.options)
    opts["logprobs"] = _logprobs_n(req.logprobs, req.top_logprobs)
    guards = getattr(st.config, "guards", None)
    if req.guards is not None:
        base = guards or Guards()
        g = req.guards
        guards = Guards(input=base.input if g.input is None else g.input,
                        output=base.output if g.output is None else g.output,
                        code=base.code if g.code is None else g.code, model=base.model)
    return GenerationRequest(messages=messages, prompt=prompt, options=opts, defaults=dict(OLLAMA_DEFAULTS),
                             constraint=_constraint(req.format), stream=req.stream, guards=guards,
                             retrieval=Retrieval(req.retrieval.collection, req.retrieval.k) if req.retrieval
                             else None,
                             fields=dict(_FIELDS, constraint="format", prompt="prompt",
                                         **{"constraint.schema": "format"}))


def generate_request(st, req: OllamaGenerateRequest) -> GenerationRequest:
    """The neutral request of an /api/generate body (with a prompt)."""
    for name in ("images", "width", "height", "steps"):
        if getattr(req, name):
            raise bad_request(f"'{name}' is not supported: this is a text model", name, code="unsupported_field")
    if req.suffix:
        raise bad_request("'suffix' (fill-in-the-middle) is not supported", "suffix", code="unsupported_field")
    if req.template:
        raise bad_request("'template' (a Go template) is not supported; create a model with a Jinja chat "
                          "template instead (llamaforge create NAME --template FILE)", "template",
                          code="unsupported_field")
    if req.raw:
        if req.system:
            raise bad_request("'system' has no effect with 'raw': put it in the prompt", "system")
        g = _common(st, req, prompt=req.prompt or "")
        g.context = list(req.context) if req.context else None
        g.fields["context"] = "context"
        return g
    msgs = [{"role": "system", "content": req.system}] if req.system else []
    msgs.append({"role": "user", "content": req.prompt or ""})
    g = _common(st, req, messages=msgs)
    if req.context:
        g.context = list(req.context)
        g.fields["context"] = "context"
    return g


def _chat_messages(req: OllamaChatRequest) -> list[dict]:
    out, call_ids = [], []
    for i, m in enumerate(req.messages or []):
        where = f"messages[{i}]"
        role = "tool" if m.role == "tool" else check_role(m.role, f"{where}.role")
        if m.images:
            raise bad_request("this model does not support images", f"{where}.images", code="unsupported_field")
        if m.thinking:
            raise bad_request(f"'{where}.thinking' is not supported", f"{where}.thinking", code="unsupported_field")
        msg = {"role": role, "content": m.content or ""}
        if m.tool_calls:
            calls = []
            for j, tc in enumerate(m.tool_calls):
                cid = tc.id or f"call_{i}_{j}"
                call_ids.append((cid, tc.function.name))
                calls.append({"id": cid, "type": "function", "function": {
                    "name": tc.function.name, "arguments": dumps(tc.function.arguments).decode()}})
            msg["tool_calls"] = calls
        if role == "tool":
            # Ollama names the tool, not the call: answer the latest call of that tool (or the latest call).
            match = [c for c, n in call_ids if m.tool_name in (None, n)]
            if match:
                msg["tool_call_id"] = match[-1]
            if m.tool_name:
                msg["name"] = m.tool_name
        out.append(msg)
    return out


def _tools(req: OllamaChatRequest) -> list[Tool]:
    out = []
    for i, t in enumerate(req.tools or []):
        fn = t.get("function") if t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"'tools[{i}]' must be {{'type': 'function', 'function': {{'name', ...}}}}",
                              f"tools[{i}]")
        out.append(Tool(fn["name"], fn.get("description") or "", fn.get("parameters") or
                        {"type": "object", "properties": {}}))
    return out


def chat_request(st, req: OllamaChatRequest) -> GenerationRequest:
    """The neutral request of an /api/chat body (with messages)."""
    g = _common(st, req, messages=_chat_messages(req))
    g.tools = _tools(req)
    return g


def _num_ctx(req) -> int | None:
    return _options(req.options)[1]


# ------------------------------------------------------------------------------------------- load / unload
async def _load_or_unload(st, entry, model: str, keep_alive, chat: bool, t0: float):
    """Ollama's empty-prompt call: load (or with keep_alive 0, unload) the model and answer at once."""
    reason = "load"
    if keep_alive is not None and keep_alive == 0:
        if entry.pinned:
            raise bad_request(f"model {display_name(entry.name)!r} was named when the server started and stays "
                              "loaded; restart the server without it to unload it", "keep_alive")
        await asyncio.to_thread(st.models.unload, entry.name)
        reason = "unload"
    body = {"model": model, "created_at": _now(), "done": True, "done_reason": reason,
            "total_duration": _ns(time.perf_counter() - t0)}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return json_response(body)


async def _plan(entry, greq: GenerationRequest, num_ctx: int | None):
    """The seam with the request's window: the engine's rows, or a smaller `num_ctx` (a larger one is capped)."""
    from ..generate.pipeline import plan
    ctx = entry.scheduler.context_length if num_ctx is None else min(num_ctx, entry.scheduler.context_length)
    if num_ctx is None:
        return await plan_request(entry, greq)
    try:
        return await asyncio.to_thread(plan, entry.lm, greq, context_length=ctx)
    except LlamaforgeError as e:
        raise api_error_from(e) from None


# ------------------------------------------------------------------------------------------------ generate
@router.post("/api/generate")
async def generate(request: Request):
    st, t0 = _state(request), time.perf_counter()
    req = await read_json(request, OllamaGenerateRequest)
    keep_alive = parse_keep_alive(req.keep_alive)
    greq = generate_request(st, req)
    num_ctx = _num_ctx(req)
    loaded_before = st.models.find(req.model) is not None
    entry = await st.models.get(req.model, keep_alive)
    load_s = 0.0 if loaded_before else entry.load_seconds
    if not req.prompt and not req.context:
        return await _load_or_unload(st, entry, req.model, keep_alive, False, t0)
    plan = await _plan(entry, greq, num_ctx)
    gen = Generation(entry, t0)
    log_fields(request, model=entry.name, generation=gen)
    choice = gen.submit(plan)[0]
    tok = entry.lm.tokenizer
    lp_n = plan.params.logprobs

    def final(c) -> dict:
        body = {"model": req.model, "created_at": _now(), "response": "", "done": True,
                "done_reason": c.finish_reason, "context": list(plan.prompt_ids) + list(c.token_ids)}
        body.update(_durations(gen, c, load_s))
        return _with_extras(body, c.result)

    if req.stream:
        async def lines():
            async for c, ev, deltas in gen.events():
                if ev.finish_reason in (ERROR, SHUTDOWN):
                    yield dumps({"error": c.error}) + b"\n"  # cut short: say why, never a normal "done"
                    return
                text = "".join(d.text for d in deltas)
                if text or (lp_n is not None and ev.finish_reason is None):
                    part = {"model": req.model, "created_at": _now(), "response": text, "done": False}
                    if lp_n is not None and ev.id >= 0:
                        part["logprobs"] = _lp_items(tok, [(ev.id, ev.logprob, ev.top_logprobs)])
                    yield dumps(part) + b"\n"
                if ev.finish_reason is not None:
                    await st.models.release(entry, keep_alive)  # keep_alive 0: gone before the client hears "done"
                    yield dumps(final(c)) + b"\n"
        return StreamingEvents(lines(), "application/x-ndjson", gen.cancel)
    try:
        await until_disconnect(request, gen.run_to_end(), gen.cancel)
    except ClientGone:
        return json_response({}, 499)
    _raise_on_error(gen)
    await st.models.release(entry, keep_alive)
    body = final(choice)
    body["response"] = choice.text
    if lp_n is not None:
        body["logprobs"] = _lp_items(tok, choice.logprobs)
    return json_response(body)


def _with_extras(body: dict, result) -> dict:
    """llamaforge's additions: citations (retrieval) and stage findings (guards)."""
    if result is not None and result.citations:
        body["citations"] = result.citations
    if result is not None and result.extra:
        body.update({k: v for k, v in result.extra.items() if k not in body})
    return body


def _raise_on_error(gen: Generation) -> None:
    err = gen.first_error()
    if err:
        raise ApiError(500, err)
    cut = next((c for c in gen.choices if c.finish_reason == SHUTDOWN), None)
    if cut is not None:
        raise ApiError(503, cut.error, headers={"Retry-After": "1"})


def _durations(gen: Generation, c, load_s: float) -> dict:
    r = c.request
    return {"total_duration": _ns(time.perf_counter() - gen.t_start), "load_duration": _ns(load_s),
            "prompt_eval_count": c.prompt_tokens, "prompt_eval_duration": _ns(r.prompt_seconds if r else 0.0),
            "eval_count": c.completion_tokens, "eval_duration": _ns(r.decode_seconds if r else 0.0)}


def _lp_items(tok, events) -> list[dict]:
    return [{"token": token_text(tok, t), "logprob": lp,
             "top_logprobs": [{"token": token_text(tok, i), "logprob": v} for i, v in (top or [])]}
            for t, lp, top in events]


def _ollama_calls(calls: list[dict]) -> list[dict]:
    return [{"function": {"name": c["function"]["name"], "arguments": tool_arguments(c)}} for c in calls]


# ---------------------------------------------------------------------------------------------------- chat
@router.post("/api/chat")
async def chat(request: Request):
    st, t0 = _state(request), time.perf_counter()
    req = await read_json(request, OllamaChatRequest)
    keep_alive = parse_keep_alive(req.keep_alive)
    num_ctx = _num_ctx(req)
    greq = chat_request(st, req) if req.messages else None
    loaded_before = st.models.find(req.model) is not None
    entry = await st.models.get(req.model, keep_alive)
    load_s = 0.0 if loaded_before else entry.load_seconds
    if greq is None:
        return await _load_or_unload(st, entry, req.model, keep_alive, True, t0)
    plan = await _plan(entry, greq, num_ctx)
    gen = Generation(entry, t0)
    log_fields(request, model=entry.name, generation=gen)
    choice = gen.submit(plan)[0]
    tok = entry.lm.tokenizer
    lp_n = plan.params.logprobs

    def final(c, content: str = "") -> dict:
        message = {"role": "assistant", "content": content}
        if c.result is not None and c.result.tool_calls:
            message["tool_calls"] = _ollama_calls(c.result.tool_calls)
        body = {"model": req.model, "created_at": _now(), "message": message, "done": True,
                "done_reason": c.finish_reason}
        body.update(_durations(gen, c, load_s))
        return _with_extras(body, c.result)

    if req.stream:
        async def lines():
            async for c, ev, deltas in gen.events():
                if ev.finish_reason in (ERROR, SHUTDOWN):
                    yield dumps({"error": c.error}) + b"\n"  # cut short: say why, never a normal "done"
                    return
                text = "".join(d.text for d in deltas)
                if text or (lp_n is not None and ev.finish_reason is None):
                    part = {"model": req.model, "created_at": _now(),
                            "message": {"role": "assistant", "content": text}, "done": False}
                    if lp_n is not None and ev.id >= 0:
                        part["logprobs"] = _lp_items(tok, [(ev.id, ev.logprob, ev.top_logprobs)])
                    yield dumps(part) + b"\n"
                if ev.finish_reason is not None:
                    await st.models.release(entry, keep_alive)  # keep_alive 0: gone before the client hears "done"
                    yield dumps(final(c)) + b"\n"
        return StreamingEvents(lines(), "application/x-ndjson", gen.cancel)
    try:
        await until_disconnect(request, gen.run_to_end(), gen.cancel)
    except ClientGone:
        return json_response({}, 499)
    _raise_on_error(gen)
    await st.models.release(entry, keep_alive)
    body = final(choice, choice.text)
    if lp_n is not None:
        body["logprobs"] = _lp_items(tok, choice.logprobs)
    return json_response(body)


# ----------------------------------------------------------------------------------------------- embeddings
def _embed_options(o: OllamaOptions | None) -> None:
    """Embedding requests take no sampling options; num_ctx is the only one that means something here."""
    given = (o or OllamaOptions()).model_dump(exclude_none=True)
    for name in given:
        if name != "num_ctx":
            raise bad_request(f"'options.{name}' has no effect on embeddings", f"options.{name}",
                              code="unsupported_field")


async def _embed(request, entry, items, truncate, dims, num_ctx=None):
    ctx = entry.scheduler.context_length if num_ctx is None else min(num_ctx, entry.scheduler.context_length)
    try:
        batch = await asyncio.to_thread(tokenize_inputs, entry.lm, items, max_tokens=ctx, truncate=truncate)
    except LlamaforgeError as e:
        raise api_error_from(e) from None
    gone = {"flag": False}
    fut = entry.scheduler.run_job(lambda: embed_ids(entry.lm.model, batch, dims, should_stop=lambda: gone["flag"]))
    try:
        vectors = await until_disconnect(request, asyncio.wrap_future(fut),
                                         lambda: (gone.update(flag=True), fut.cancel()))
    except ClientGone:
        raise
    except Exception as e:
        raise api_error_from(e) from None
    return vectors, sum(len(b) for b in batch)


@router.post("/api/embed")
async def embed(request: Request):
    st, t0 = _state(request), time.perf_counter()
    req = await read_json(request, OllamaEmbedRequest)
    items = [req.input] if isinstance(req.input, str) else list(req.input)
    if not items:
        raise bad_request("'input' must not be empty", "input")
    _embed_options(req.options)
    keep_alive = parse_keep_alive(req.keep_alive)
    loaded_before = st.models.find(req.model) is not None
    entry = await st.models.get(req.model, keep_alive)
    try:
        dims = check_dimensions(entry.lm, req.dimensions)
    except LlamaforgeError as e:
        raise api_error_from(e) from None
    try:
        vectors, n = await _embed(request, entry, items, req.truncate, dims,
                                  req.options.num_ctx if req.options else None)
    except ClientGone:
        return json_response({}, 499)
    await st.models.release(entry, keep_alive)
    return json_response({"model": req.model, "embeddings": vectors, "total_duration": _ns(time.perf_counter() - t0),
                          "load_duration": _ns(0 if loaded_before else entry.load_seconds),
                          "prompt_eval_count": n})


@router.post("/api/embeddings")
async def embeddings_legacy(request: Request):
    st = _state(request)
    req = await read_json(request, OllamaLegacyEmbeddingsRequest)
    _embed_options(req.options)
    entry = await st.models.get(req.model, parse_keep_alive(req.keep_alive))
    if not req.prompt:
        return json_response({"embedding": []})  # Ollama answers an empty prompt with an empty vector
    try:
        vectors, _ = await _embed(request, entry, [req.prompt], True, None)
    except ClientGone:
        return json_response({}, 499)
    return json_response({"embedding": vectors[0]})
