"""The OpenAI dialect: /v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings.

Responses follow the OpenAI API reference shapes (ids, `object` names, usage, logprobs layouts); streams are
server-sent events ending with `data: [DONE]`. Errors use {"error": {"message", "type", "param", "code"}}.
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
from ..errors import InvalidRequestError, LlamaforgeError
from ..generate.sampling import SamplingParams, params_from_options
from .app import normalize_name
from .common import (ClientGone, Generation, StreamingEvents, api_error_from, dumps, json_response, read_json,
                     until_disconnect)
from .embeddings import check_dimensions, embed_ids, tokenize_inputs
from ..generate.constraints.stage import json_processors
from .prompts import defaults_options, encode_chat, encode_raw, token_text, with_default_system
from .scheduler import ERROR, SHUTDOWN
from .schemas import (MAX_BATCH_PROMPTS, MAX_LOGPROBS_COMPLETIONS, MAX_TOP_LOGPROBS_CHAT, ApiError,
                      OpenAIChatRequest, OpenAICompletionRequest, OpenAIEmbeddingRequest, bad_request, check_float,
                      check_int, check_max_tokens, check_n, check_role, check_seed, check_stop, check_top_p)

router = APIRouter()
FINGERPRINT = f"llamaforge-{__version__}"


def _state(request: Request):
    return request.app.state.server


def _oa_finish(reason: str | None) -> str | None:
    # Streams cut by shutdown end with a normal-looking "stop" so clients close cleanly.
    return "stop" if reason == SHUTDOWN else reason


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


# ----------------------------------------------------------------------------------------------- sampling
def _sampling(entry, *, max_tokens, temperature, top_p, seed, stop, presence, frequency, logprobs,
              stop_ids=()) -> SamplingParams:
    try:
        base = params_from_options(defaults_options(entry))
    except InvalidRequestError:
        base = {}
    base.update(top_k=0, min_p=0.0)  # OpenAI has no top_k/min_p: sample from the whole distribution
    base.setdefault("temperature", 1.0)
    base.setdefault("top_p", 1.0)
    if temperature is not None:
        base["temperature"] = temperature
    if top_p is not None:
        base["top_p"] = top_p
    base.update(max_tokens=max_tokens or entry.scheduler.context_length, seed=seed,
                presence_penalty=presence, frequency_penalty=frequency, logprobs=logprobs)
    if stop:
        base["stop"] = tuple(stop)
    base["stop_ids"] = tuple(stop_ids)
    try:
        return SamplingParams(**base).validate()
    except InvalidRequestError as e:
        raise api_error_from(e) from None


def _check_common(req, max_tokens_field="max_tokens", allow_zero=False):
    check_float(req.temperature, "temperature", low=0.0, high=2.0)
    check_top_p(req.top_p)
    check_n(req.n)
    check_seed(req.seed)
    check_float(req.presence_penalty, "presence_penalty", low=-2.0, high=2.0)
    check_float(req.frequency_penalty, "frequency_penalty", low=-2.0, high=2.0)
    return check_stop(req.stop)


# ------------------------------------------------------------------------------------------- chat completions
def _chat_messages(req: OpenAIChatRequest) -> list[dict[str, str]]:
    if not req.messages:
        raise bad_request("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(req.messages):
        role = check_role(m.role, f"messages[{i}].role")
        if isinstance(m.content, list):
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}]: only text content parts are supported "
                                      f"(got {part.type!r})", f"messages[{i}].content")
                texts.append(part.text)
            content = "".join(texts)
        else:
            content = m.content or ""
        out.append({"role": role, "content": content})
    return out


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    st = _state(request)
    req = await read_json(request, OpenAIChatRequest)
    stop = _check_common(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        max_tokens = check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
    elif req.max_completion_tokens is not None:
        max_tokens = check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
    else:
        max_tokens = check_max_tokens(req.max_tokens, "max_tokens")
    check_int(req.top_logprobs, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs': true", "top_logprobs")
    fmt_type = req.response_format.type if req.response_format else "text"
    if fmt_type not in ("text", "json_object", "json_schema"):
        raise bad_request(f"unsupported response_format type {fmt_type!r}", "response_format.type")
    json_mode = fmt_type != "text"
    messages = _chat_messages(req)
    entry = await st.models.get(req.model)
    prompt_ids, stop_ids = encode_chat(entry, with_default_system(entry, messages, json_mode))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = _sampling(entry, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                       stop=stop, presence=req.presence_penalty, frequency=req.frequency_penalty,
                       logprobs=logprobs, stop_ids=stop_ids)
    gen = Generation(entry)
    for i in range(req.n):
        p = params if req.seed is None or i == 0 else params.replace(seed=req.seed + i)
        gen.submit(prompt_ids, p, json_processors(entry) if json_mode else None)
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
    choices = [{
        "index": c.index,
        "message": {"role": "assistant", "content": c.text, "refusal": None},
        "logprobs": {"content": [_chat_logprob(tok, t, lp, top) for t, lp, top in c.logprobs]}
        if req.logprobs else None,
        "finish_reason": _oa_finish(c.finish_reason),
    } for c in gen.choices]
    return json_response({"id": cid, "object": "chat.completion", "created": created, "model": entry.name,
                          "system_fingerprint": FINGERPRINT, "choices": choices, "usage": gen.usage()})


def _raise_on_error(gen: Generation) -> None:
    err = gen.first_error()
    if err:
        raise ApiError(500, err, type="server_error")
    if any(c.finish_reason == SHUTDOWN for c in gen.choices):
        raise ApiError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "1"})


def _chat_logprob(tok, token_id: int, logprob: float, top) -> dict:
    text = token_text(tok, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8")),
            "top_logprobs": [{"token": token_text(tok, i), "logprob": lp,
                              "bytes": list(token_text(tok, i).encode("utf-8"))} for i, lp in (top or [])]}


def _sse(obj) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


async def _chat_stream(gen: Generation, cid, created, model, want_logprobs, include_usage, tok):
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": FINGERPRINT}

    def chunk(choices, usage_field=True):
        d = dict(base, choices=choices)
        if include_usage and usage_field:
            d["usage"] = None
        return _sse(d)

    for c in gen.choices:  # the role comes first, as OpenAI sends it
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    async for c, ev, delta in gen.events():
        if ev.finish_reason == ERROR:
            yield _sse({"error": {"message": c.error, "type": "server_error", "param": None, "code": None}})
            gen.cancel()
            return
        lp = None
        if want_logprobs and ev.id >= 0 and ev.finish_reason != SHUTDOWN:
            lp = {"content": [_chat_logprob(tok, ev.id, ev.logprob, ev.top_logprobs)]}
        if delta or lp:
            yield chunk([{"index": c.index, "delta": {"content": delta}, "logprobs": lp, "finish_reason": None}])
        if ev.finish_reason is not None:
            yield chunk([{"index": c.index, "delta": {}, "logprobs": None,
                          "finish_reason": _oa_finish(ev.finish_reason)}])
    if include_usage:
        yield _sse(dict(base, choices=[], usage=gen.usage()))
    yield b"data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------ completions
def _prompts(req: OpenAICompletionRequest, entry) -> list[list[int]]:
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
    vocab = int(entry.lm.config.vocab_size)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(encode_raw(entry, item))
        else:
            if not item:
                raise bad_request(f"'prompt[{i}]' is an empty token list", "prompt")
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"'prompt' has token id {bad} outside the vocabulary (size {vocab})", "prompt")
            out.append(list(item))
    return out


@router.post("/v1/completions")
async def completions(request: Request):
    st = _state(request)
    req = await read_json(request, OpenAICompletionRequest)
    stop = _check_common(req)
    max_tokens = check_max_tokens(req.max_tokens, "max_tokens", allow_zero=req.echo)
    check_int(req.logprobs, "logprobs", 0, MAX_LOGPROBS_COMPLETIONS)
    if req.suffix:
        raise bad_request("'suffix' (insertion) is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("'best_of' different from 'n' is not supported", "best_of")
    if req.stream and req.echo and req.logprobs is not None:
        raise bad_request("'echo' with 'logprobs' is only supported without streaming", "stream")
    entry = await st.models.get(req.model)
    prompts = _prompts(req, entry)
    ctx = entry.scheduler.context_length
    for ids in prompts:
        if len(ids) >= ctx and not (max_tokens == 0 and len(ids) <= ctx):
            raise api_error_from(_ctx_error(len(ids), ctx))
    tok = entry.lm.tokenizer
    cid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())

    prompt_lps = None
    if req.echo and req.logprobs is not None:
        prompt_lps = await _prompt_logprobs(request, entry, prompts, req.logprobs)

    if max_tokens == 0:  # scoring only (evaluation harnesses): echo the prompt, generate nothing
        choices = []
        for pi, ids in enumerate(prompts):
            for j in range(req.n):
                choices.append(_completion_choice(tok, len(choices), ids, [], "", "length", req, prompt_lps, pi))
        n_prompt = sum(len(p) for p in prompts)
        return json_response({"id": cid, "object": "text_completion", "created": created, "model": entry.name,
                              "system_fingerprint": FINGERPRINT, "choices": choices,
                              "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0,
                                        "total_tokens": n_prompt}})

    params = _sampling(entry, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                       seed=req.seed, stop=stop, presence=req.presence_penalty, frequency=req.frequency_penalty,
                       logprobs=req.logprobs)
    gen = Generation(entry)
    for pi, ids in enumerate(prompts):
        for j in range(req.n):
            p = params if req.seed is None or j == 0 else params.replace(seed=req.seed + j)
            gen.submit(ids, p, group=pi)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        echo_texts = [tok.decode(prompts[i // req.n]) for i in range(len(gen.choices))] if req.echo else None
        return StreamingEvents(_completion_stream(gen, cid, created, entry.name, req.logprobs, usage, tok,
                                                  echo_texts), "text/event-stream", gen.cancel,
                               headers={"Cache-Control": "no-cache"})
    try:
        await until_disconnect(request, gen.run_to_end(), gen.cancel)
    except ClientGone:
        return json_response({}, 499)
    _raise_on_error(gen)
    choices = [_completion_choice(tok, c.index, prompts[c.group], c.logprobs, c.text, _oa_finish(c.finish_reason),
                                  req, prompt_lps, c.group) for c in gen.choices]
    return json_response({"id": cid, "object": "text_completion", "created": created, "model": entry.name,
                          "system_fingerprint": FINGERPRINT, "choices": choices, "usage": gen.usage()})


def _ctx_error(n, ctx):
    from ..errors import ContextLengthError
    return ContextLengthError(n, ctx)


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
    async for c, ev, delta in gen.events():
        if ev.finish_reason == ERROR:
            yield _sse({"error": {"message": c.error, "type": "server_error", "param": None, "code": None}})
            gen.cancel()
            return
        lp = None
        if logprobs_n is not None and ev.id >= 0 and ev.finish_reason != SHUTDOWN:
            lp = {"tokens": [token_text(tok, ev.id)], "token_logprobs": [ev.logprob],
                  "top_logprobs": [{token_text(tok, i): v for i, v in (ev.top_logprobs or [])}],
                  "text_offset": [len(c.text) - len(delta)]}
        if delta or lp or ev.finish_reason is not None:
            yield chunk([{"index": c.index, "text": delta, "logprobs": lp,
                          "finish_reason": _oa_finish(ev.finish_reason)}])
    if include_usage:
        yield _sse(dict(base, choices=[], usage=gen.usage()))
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
    for i, it in enumerate(items):
        if isinstance(it, str) and not it:
            raise bad_request(f"'input[{i}]' is an empty string", "input")
    entry = await st.models.get(req.model)
    dims = check_dimensions(entry.lm, req.dimensions)
    batch = tokenize_inputs(entry.lm, items, max_tokens=entry.scheduler.context_length, truncate=False)
    fut = entry.scheduler.run_job(lambda: embed_ids(entry.lm.model, batch, dims))
    try:
        vectors = await until_disconnect(request, asyncio.wrap_future(fut), fut.cancel)
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
