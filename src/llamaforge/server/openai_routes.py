"""The OpenAI dialect: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Translation only: wire JSON -> `GenerationRequest` (the seam validates and plans it), seam output -> wire JSON.
Responses follow the OpenAI API reference shapes (ids, `object` names, usage, logprobs layouts, tool-call deltas);
streams are server-sent events ending with `data: [DONE]`. Errors use {"error": {"message", "type", "param",
"code"}}. Every request field of the official client is either mapped here or refused by name (UNSUPPORTED).
"""
from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid

from fastapi import APIRouter
from starlette.requests import Request

from .. import __version__
from ..errors import LlamaforgeError
from ..generate.embed import check_dimensions, embed_ids, tokenize_inputs
from ..generate.request import Constraint, GenerationRequest, Guards, Retrieval, Tool
from .common import (ClientGone, Generation, StreamingEvents, api_error_from, dumps, json_response, log_fields,
                     plan_request, read_json, token_text, until_disconnect)
from .models import normalize_name
from .scheduler import ERROR, SHUTDOWN
from .schemas import (MAX_BATCH_PROMPTS, MAX_LOGPROBS_COMPLETIONS, MAX_TOP_LOGPROBS_CHAT, ApiError,
                      OpenAIChatRequest, OpenAICompletionRequest, OpenAIEmbeddingRequest, bad_request, check_int,
                      check_max_tokens, check_n, check_role)

router = APIRouter()
FINGERPRINT = f"llamaforge-{__version__}"
# OpenAI's documented ranges, narrower than the engine's own.
LIMITS = {"temperature": (0.0, 2.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}

# Fields of the OpenAI chat API this server does not implement, and the values that ask for nothing (accepted).
UNSUPPORTED = {
    "audio": (None,), "function_call": (None,), "functions": (None,), "moderation": (None,),
    "prediction": (None,), "prompt_cache_key": (None,), "prompt_cache_options": (None,),
    "prompt_cache_retention": (None,), "reasoning_effort": (None,), "verbosity": (None,),
    "web_search_options": (None,), "metadata": (None, {}), "store": (None, False),
    "modalities": (None, ["text"]), "service_tier": (None, "auto", "default"),
}
_WHY = {"functions": "use 'tools'", "function_call": "use 'tool_choice'", "store": "nothing is stored",
        "metadata": "completions are not stored", "modalities": "text only", "service_tier": "one tier only"}


def _state(request: Request):
    return request.app.state.server


# ------------------------------------------------------------------------------------------------------ models
@router.get("/v1/models")
async def list_models(request: Request):
    st = _state(request)
    data = [{"id": name, "object": "model", "created": int(e.loaded_wall), "owned_by": "llamaforge"}
            for name, e in sorted(st.models.entries.items())]
    if st.config.load_on_demand:  # store models a request may name (they load on first use)
        seen = set(st.models.entries)
        for row in await asyncio.to_thread(_store_rows):
            short = normalize_name(row.name)
            if short not in seen:
                seen.add(short)
                data.append({"id": short, "object": "model", "created": int(row.modified),
                             "owned_by": "llamaforge"})
    return json_response({"object": "list", "data": data})


def _store_rows():
    from ..store import Store
    try:
        return Store().list()
    except LlamaforgeError:
        return []  # an unreadable store must not break the model list


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    e = _state(request).models.find(model_id)
    if e is None:
        raise ApiError(404, f"model {model_id!r} not found", param="model", code="model_not_found")
    return json_response({"id": e.name, "object": "model", "created": int(e.loaded_wall), "owned_by": "llamaforge"})


# ------------------------------------------------------------------------------------------- translation in
def _sampling(req, max_tokens) -> dict:
    """Request options in SamplingParams names. OpenAI has no top_k/min_p: the whole distribution is sampled
    unless the caller uses the llama.cpp/vLLM extensions."""
    opts = {"top_k": req.top_k if req.top_k is not None else 0, "min_p": req.min_p if req.min_p is not None else 0.0,
            "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed, "max_tokens": max_tokens,
            "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
            "repeat_penalty": req.repeat_penalty, "stop": _stops(req.stop)}
    if req.logit_bias:
        try:
            opts["logit_bias"] = tuple((int(k), v) for k, v in req.logit_bias.items())
        except ValueError:
            raise bad_request("'logit_bias' keys must be token ids", "logit_bias") from None
    return opts


def _stops(stop) -> tuple[str, ...] | None:
    if stop is None:
        return None
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop) if s)


def _refuse_unsupported(req) -> None:
    for name, accepted in UNSUPPORTED.items():
        value = getattr(req, name)
        if not any(value == a and type(value) is type(a) for a in accepted):
            why = _WHY.get(name, "not implemented by this server")
            raise bad_request(f"'{name}' is not supported ({why})", name, code="unsupported_field")


def _messages(req: OpenAIChatRequest) -> list[dict]:
    if not req.messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = check_role(m.role, f"{where}.role") if m.role != "tool" else "tool"
        for name in ("audio", "function_call"):
            if getattr(m, name) is not None:
                raise bad_request(f"'{where}.{name}' is not supported", f"{where}.{name}", code="unsupported_field")
        if m.name is not None:
            raise bad_request(f"'{where}.name' (participant names) is not supported", f"{where}.name",
                              code="unsupported_field")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type not in ("text", "refusal") or (part.text is None and part.type == "text"):
                    raise bad_request(f"{where}.content[{j}]: only text content parts are supported "
                                      f"(got {part.type!r})", f"{where}.content")
                texts.append(part.text or getattr(part, "refusal", None) or "")
            content = "".join(texts)
        else:
            content = m.content
        msg = {"role": role, "content": content if content is not None else (m.refusal or "")}
        if m.tool_calls:
            msg["tool_calls"] = [tc.model_dump() for tc in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _constraint(fmt) -> Constraint | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint("json")
    if fmt.type == "json_schema":
        js = fmt.json_schema
        if js is None or js.schema_ is None:
            raise bad_request("'response_format.json_schema.schema' is required", "response_format.json_schema")
        return Constraint("json_schema", schema=js.schema_, strict=bool(js.strict), name=js.name)
    raise bad_request(f"unsupported response_format type {fmt.type!r}", "response_format.type")


def _tools(req: OpenAIChatRequest) -> list[Tool]:
    out = []
    for i, t in enumerate(req.tools or []):
        if t.type != "function" or t.function is None:
            raise bad_request(f"'tools[{i}]': only function tools are supported", f"tools[{i}].type")
        f = t.function
        out.append(Tool(f.name, f.description or "", f.parameters or {"type": "object", "properties": {}}))
    return out


def _tool_choice(choice):
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    fn = choice.get("function") if choice.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': "
                          "{'name': ...}}", "tool_choice")
    return {"name": fn["name"]}


def _guards(st, g) -> Guards | None:
    default = getattr(st.config, "guards", None)
    if g is None:
        return default
    base = default or Guards()
    return Guards(input=base.input if g.input is None else g.input,
                  output=base.output if g.output is None else g.output,
                  code=base.code if g.code is None else g.code, model=base.model)


def chat_request(st, req: OpenAIChatRequest) -> GenerationRequest:
    """The neutral request of a /v1/chat/completions body."""
    _refuse_unsupported(req)
    check_n(req.n)
    check_int(req.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    field, value = ("max_completion_tokens", req.max_completion_tokens) if req.max_completion_tokens is not None \
        else ("max_tokens", req.max_tokens)
    opts = _sampling(req, check_max_tokens(value, field))
    opts["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    if not req.tools:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(req, name) is not None and getattr(req, name) != "none":
                raise bad_request(f"'{name}' is only allowed when 'tools' are given", name)
    return GenerationRequest(
        messages=_messages(req), options=opts, constraint=_constraint(req.response_format), tools=_tools(req),
        tool_choice=_tool_choice(req.tool_choice),
        parallel_tool_calls=True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        retrieval=Retrieval(req.retrieval.collection, req.retrieval.k) if req.retrieval else None,
        guards=_guards(st, req.guards), n=req.n, stream=req.stream, limits=LIMITS,
        fields={"max_tokens": field, "constraint": "response_format", "prompt": "messages", "stop_ids": "messages",
                "constraint.schema": "response_format.json_schema.schema"})


# ------------------------------------------------------------------------------------------- chat completions
@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st = _state(request)
    req = await read_json(request, OpenAIChatRequest)
    greq = chat_request(st, req)
    entry = await st.models.get(req.model)
    plan = await plan_request(entry, greq)
    gen = Generation(entry)
    log_fields(request, model=entry.name, generation=gen, user=req.safety_identifier or req.user)
    gen.submit(plan)
    cid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
    tok = entry.lm.tokenizer
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingEvents(_chat_stream(gen, cid, created, entry.name, req.logprobs, usage, tok),
                               "text/event-stream", gen.cancel, headers={"Cache-Control": "no-cache"})
    try:
        await until_disconnect(request, gen.run_to_end(), gen.cancel)
    except ClientGone:
        return json_response({}, 499)
    _raise_on_error(gen)
    choices = [_chat_choice(c, tok, req.logprobs) for c in gen.choices]
    return json_response({"id": cid, "object": "chat.completion", "created": created, "model": entry.name,
                          "system_fingerprint": FINGERPRINT, "choices": choices, "usage": _usage(gen)})


def _chat_choice(c, tok, want_logprobs: bool) -> dict:
    r = c.result
    message = {"role": "assistant", "content": c.text if (c.text or not r.tool_calls) else None, "refusal": None}
    if r.tool_calls:
        message["tool_calls"] = r.tool_calls
    out = {"index": c.index, "message": message,
           "logprobs": {"content": [_chat_logprob(tok, t, lp, top) for t, lp, top in c.logprobs]}
           if want_logprobs else None, "finish_reason": c.finish_reason}
    return _with_extras(out, r)


def _with_extras(obj: dict, result) -> dict:
    """llamaforge's additions beside the message: citations (retrieval) and stage findings (guards)."""
    if result is not None and result.citations:
        obj["citations"] = result.citations
    if result is not None and result.extra:
        obj.update({k: v for k, v in result.extra.items() if k not in obj})
    return obj


def _raise_on_error(gen: Generation) -> None:
    err = gen.first_error()
    if err:
        raise ApiError(500, err, type="server_error")
    cut = next((c for c in gen.choices if c.finish_reason == SHUTDOWN), None)
    if cut is not None:
        raise ApiError(503, cut.error, code="shutting_down", headers={"Retry-After": "1"})


def _chat_logprob(tok, token_id: int, logprob: float, top) -> dict:
    text = token_text(tok, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": token_text(tok, i), "logprob": lp,
                              "bytes": list(token_text(tok, i).encode("utf-8"))} for i, lp in (top or [])]}


def _sse(obj) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def _cut(c, ev) -> bytes:
    """The event that ends a stream cut short: an error (the client raises it), naming why."""
    code = "shutting_down" if ev.finish_reason == SHUTDOWN else None
    return _sse({"error": {"message": c.error, "type": "server_error", "param": None, "code": code}})


async def _chat_stream(gen: Generation, cid, created, model, want_logprobs, include_usage, tok):
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT}

    def chunk(choices):
        d = dict(base, choices=choices)
        if include_usage:
            d["usage"] = None
        return _sse(d)

    for c in gen.choices:  # the role comes first, as OpenAI sends it
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for c, ev, deltas in gen.events():
        if ev.finish_reason in (ERROR, SHUTDOWN):
            yield _cut(c, ev)
            gen.cancel()
            yield b"data: [DONE]\n\n"
            return
        lp = None
        if want_logprobs and ev.id >= 0 and ev.finish_reason != SHUTDOWN:
            lp = {"content": [_chat_logprob(tok, ev.id, ev.logprob, ev.top_logprobs)]}
        for d in deltas:
            delta = {"content": d.text} if d.text else {}
            if d.tool_calls:
                delta["tool_calls"] = d.tool_calls
            if delta:
                yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": None}])
                lp = None
        if lp is not None:
            yield chunk([{"index": c.index, "delta": {"content": ""}, "logprobs": lp, "finish_reason": None}])
        if ev.finish_reason is not None:
            yield chunk([_with_extras({"index": c.index, "delta": {}, "logprobs": None,
                                       "finish_reason": c.finish_reason}, c.result)])
    if include_usage:
        yield _sse(dict(base, choices=[], usage=_usage(gen)))
    yield b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------ completions
def _prompt_items(req: OpenAICompletionRequest) -> list:
    p = req.prompt
    if isinstance(p, str):
        items = [p]
    elif not p:
        raise bad_request("'prompt' must not be an empty array", "prompt")
    elif isinstance(p[0], int):
        items = [p]
    else:
        items = list(p)
    if len(items) > MAX_BATCH_PROMPTS:
        raise bad_request(f"at most {MAX_BATCH_PROMPTS} prompts per request", "prompt")
    for i, item in enumerate(items):
        if not isinstance(item, str) and not item:
            raise bad_request(f"'prompt[{i}]' is an empty token list", "prompt")
    return items


def completion_requests(st, req: OpenAICompletionRequest) -> list[GenerationRequest]:
    """One neutral request per prompt of a /v1/completions body."""
    check_n(req.n)
    max_tokens = check_max_tokens(req.max_tokens, "max_tokens", allow_zero=req.echo)
    check_int(req.logprobs, "logprobs", 0, MAX_LOGPROBS_COMPLETIONS)
    if req.suffix:
        raise bad_request("'suffix' (insertion) is not supported", "suffix", code="unsupported_field")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("'best_of' different from 'n' is not supported", "best_of", code="unsupported_field")
    if req.stream and req.echo and req.logprobs is not None:
        raise bad_request("'echo' with 'logprobs' is only supported without streaming", "stream")
    # max_tokens 0 (scoring only, with echo) still plans one token so the prompt is validated the same way.
    opts = _sampling(req, max_tokens or 1)
    opts["logprobs"] = req.logprobs
    return [GenerationRequest(prompt=item, options=dict(opts), n=req.n, stream=req.stream, limits=LIMITS,
                              guards=getattr(st.config, "guards", None))
            for item in _prompt_items(req)]


@router.post("/v1/completions")
async def completions(request: Request):
    st = _state(request)
    req = await read_json(request, OpenAICompletionRequest)
    greqs = completion_requests(st, req)
    entry = await st.models.get(req.model)
    scoring = req.max_tokens == 0
    if scoring:  # a prompt may fill the whole window when nothing is generated
        for g in greqs:
            g.options["max_tokens"] = 1
    plans = []
    for g in greqs:
        try:
            plans.append(await plan_request(entry, g))
        except ApiError as e:
            if not (scoring and e.code == "context_length_exceeded"):
                raise
            plans.append(await _scoring_plan(entry, g))
    prompts = [p.prompt_ids for p in plans]
    tok = entry.lm.tokenizer
    cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())

    prompt_lps = None
    if req.echo and req.logprobs is not None:
        prompt_lps = await _prompt_logprobs(request, entry, prompts, req.logprobs)

    if scoring:  # scoring only (evaluation harnesses): echo the prompt, generate nothing
        choices = []
        for pi, ids in enumerate(prompts):
            for _ in range(req.n):
                choices.append(_completion_choice(tok, len(choices), ids, [], "", "length", req, prompt_lps, pi))
        n_prompt = sum(len(p) for p in prompts)
        return json_response({"id": cid, "object": "text_completion", "created": created, "model": entry.name,
                              "system_fingerprint": FINGERPRINT, "choices": choices,
                              "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0,
                                        "total_tokens": n_prompt}})

    gen = Generation(entry)
    log_fields(request, model=entry.name, generation=gen, user=req.user)
    for pi, p in enumerate(plans):
        gen.submit(p, group=pi)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        echo_texts = [tok.decode(prompts[c.group]) for c in gen.choices] if req.echo else None
        return StreamingEvents(_completion_stream(gen, cid, created, entry.name, req.logprobs, usage, tok,
                                                  echo_texts), "text/event-stream", gen.cancel,
                               headers={"Cache-Control": "no-cache"})
    try:
        await until_disconnect(request, gen.run_to_end(), gen.cancel)
    except ClientGone:
        return json_response({}, 499)
    _raise_on_error(gen)
    choices = [_with_extras(_completion_choice(tok, c.index, prompts[c.group], c.logprobs, c.text,
                                               c.finish_reason, req, prompt_lps, c.group), c.result)
               for c in gen.choices]
    return json_response({"id": cid, "object": "text_completion", "created": created, "model": entry.name,
                          "system_fingerprint": FINGERPRINT, "choices": choices, "usage": _usage(gen)})


async def _scoring_plan(entry, g: GenerationRequest):
    """A prompt that fills the whole window, scored without generating: planned against a window one larger
    (nothing is generated, so nothing needs the room)."""
    from ..generate.pipeline import plan
    try:
        return await asyncio.to_thread(plan, entry.lm, g, context_length=entry.scheduler.context_length + 1)
    except LlamaforgeError as e:
        raise api_error_from(e) from None


async def _prompt_logprobs(request, entry, prompts, top_n):
    from ..generate.engine import prompt_logprobs
    lm = entry.lm

    def work():
        return [prompt_logprobs(lm, ids, top_n) for ids in prompts]
    fut = entry.scheduler.run_job(work)
    try:
        return await until_disconnect(request, asyncio.wrap_future(fut), fut.cancel)
    except ClientGone:
        raise
    except Exception as e:
        raise api_error_from(e) from None


def _completion_choice(tok, index, prompt_ids, gen_lps, text, finish, req, prompt_lps, group) -> dict:
    """One /v1/completions choice; with echo the prompt text (and its token logprobs) come first."""
    full_text = (tok.decode(prompt_ids) if req.echo else "") + text
    logprobs = None
    if req.logprobs is not None:
        entries: list[tuple[int, float | None, list | None]] = []
        if req.echo:
            entries += [(t, lp, top) for t, (lp, top) in zip(prompt_ids, prompt_lps[group])]
        entries += [(t, lp, top) for t, lp, top in gen_lps]
        ids = [t for t, _, _ in entries]
        logprobs = {
            "tokens": [token_text(tok, t) for t in ids],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {token_text(tok, i): v for i, v in top}
                             for _, _, top in entries],
            "text_offset": _text_offsets(tok, ids, 0),
        }
    return {"index": index, "text": full_text, "logprobs": logprobs, "finish_reason": finish}


def _text_offsets(tok, ids: list[int], start: int) -> list[int]:
    dec = tok.stream_decoder()
    out, n = [], start
    for t in ids:
        out.append(n)
        n += len(dec.feed(t))
    return out


async def _completion_stream(gen, cid, created, model, logprobs_n, include_usage, tok, echo_texts):
    base = {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT}

    def chunk(choices):
        d = dict(base, choices=choices)
        if include_usage:
            d["usage"] = None
        return _sse(d)

    if echo_texts:
        for c in gen.choices:
            yield chunk([{"index": c.index, "text": echo_texts[c.index], "logprobs": None, "finish_reason": None}])
    async for c, ev, deltas in gen.events():
        if ev.finish_reason in (ERROR, SHUTDOWN):
            yield _cut(c, ev)
            gen.cancel()
            yield b"data: [DONE]\n\n"
            return
        text = "".join(d.text for d in deltas)
        lp = None
        if logprobs_n is not None and ev.id >= 0 and ev.finish_reason != SHUTDOWN:
            lp = {"tokens": [token_text(tok, ev.id)], "token_logprobs": [ev.logprob],
                  "top_logprobs": [{token_text(tok, i): v for i, v in (ev.top_logprobs or [])}],
                  "text_offset": [len(c.text) - len(text)]}
        if text or lp or ev.finish_reason is not None:
            part = {"index": c.index, "text": text, "logprobs": lp,
                    "finish_reason": c.finish_reason if ev.finish_reason is not None else None}
            yield chunk([_with_extras(part, c.result) if ev.finish_reason is not None else part])
    if include_usage:
        yield _sse(dict(base, choices=[], usage=_usage(gen)))
    yield b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------- embeddings
@router.post("/v1/embeddings")
async def embeddings(request: Request):
    st = _state(request)
    req = await read_json(request, OpenAIEmbeddingRequest)
    inp = req.input
    if isinstance(inp, str):
        items = [inp]
    elif not inp:
        raise bad_request("'input' must not be empty", "input")
    elif isinstance(inp[0], int):
        items = [inp]
    else:
        items = list(inp)
    if len(items) > 2048:
        raise bad_request("at most 2048 inputs per request", "input")
    entry = await st.models.get(req.model)
    log_fields(request, model=entry.name, user=req.user)
    try:
        dims = check_dimensions(entry.lm, req.dimensions)
        batch = await asyncio.to_thread(tokenize_inputs, entry.lm, items,
                                        max_tokens=entry.scheduler.context_length, truncate=False)
    except LlamaforgeError as e:
        raise api_error_from(e) from None
    gone = {"flag": False}
    fut = entry.scheduler.run_job(lambda: embed_ids(entry.lm.model, batch, dims, should_stop=lambda: gone["flag"]))
    try:
        vectors = await until_disconnect(request, asyncio.wrap_future(fut),
                                         lambda: (gone.update(flag=True), fut.cancel()))
    except ClientGone:
        return json_response({}, 499)
    except Exception as e:
        raise api_error_from(e) from None
    data = []
    for i, v in enumerate(vectors):
        emb = v if req.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    n = sum(len(b) for b in batch)
    return json_response({"object": "list", "data": data, "model": entry.name,
                          "usage": {"prompt_tokens": n, "total_tokens": n}})


def _usage(gen: Generation) -> dict:
    """OpenAI usage, with the prompt tokens served from the prefix cache (`prompt_tokens_details`)."""
    return dict(gen.usage(), prompt_tokens_details={"cached_tokens": gen.cached_tokens()})
