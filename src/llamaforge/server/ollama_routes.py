"""The Ollama dialect: /api/generate, /api/chat (NDJSON streams), /api/embed, /api/embeddings, /api/tags,
/api/show, /api/ps, /api/version, /api/create, /api/copy, /api/delete.

Shapes follow Ollama's API docs: streams are one JSON object per line; the last has `done: true`,
`done_reason` and durations in nanoseconds. Errors are {"error": "message"}.
"""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

from fastapi import APIRouter
from starlette.requests import Request

from .. import __version__
from ..errors import InvalidRequestError, LlamaforgeError, ModelNotFoundError, StoreError
from ..generate.sampling import SamplingParams, params_from_options
from .common import (ClientGone, Generation, StreamingEvents, api_error_from, dumps, json_response, read_json,
                     until_disconnect)
from .embeddings import check_dimensions, embed_ids, tokenize_inputs
from ..generate.constraints.stage import json_processors
from .prompts import defaults_options, encode_chat, encode_raw, token_text, with_default_system
from .scheduler import ERROR, SHUTDOWN
from .schemas import (MAX_TOP_LOGPROBS_CHAT, ApiError, OllamaChatRequest, OllamaCopyRequest, OllamaCreateRequest, OllamaEmbedRequest,
                      OllamaGenerateRequest, OllamaLegacyEmbeddingsRequest, OllamaModelRequest, OllamaOptions,
                      bad_request, check_float, check_int, check_role, check_seed, check_stop, check_top_p,
                      parse_keep_alive)

router = APIRouter()

# Ollama's sampling defaults (applied under the model's own defaults and the request's options).
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1,
                   "repeat_last_n": 64}


def _state(request: Request):
    return request.app.state.server


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


# ------------------------------------------------------------------------------------------------- options
def _check_options(o: OllamaOptions | None) -> OllamaOptions:
    o = o or OllamaOptions()
    check_int(o.num_ctx, "options.num_ctx", 1)
    if o.num_predict is not None and o.num_predict not in (-1, -2):
        check_int(o.num_predict, "options.num_predict", 1, 1_000_000)
    check_float(o.temperature, "options.temperature", low=0.0)
    check_int(o.top_k, "options.top_k", 0)
    check_top_p(o.top_p, "options.top_p")
    check_float(o.min_p, "options.min_p", low=0.0, high=1.0)
    check_float(o.repeat_penalty, "options.repeat_penalty", low=0.0, low_open=True)
    check_int(o.repeat_last_n, "options.repeat_last_n", -1)
    check_float(o.presence_penalty, "options.presence_penalty")
    check_float(o.frequency_penalty, "options.frequency_penalty")
    check_seed(o.seed, "options.seed")
    check_stop(o.stop, "options.stop")
    return o


def _sampling(entry, o: OllamaOptions, prompt_len: int, *, logprobs: int | None, stop_ids=()) -> SamplingParams:
    opts = dict(OLLAMA_DEFAULTS)
    try:
        opts.update(params_from_options(defaults_options(entry)))
    except InvalidRequestError:
        pass
    given = o.model_dump(exclude_none=True)
    given.pop("num_ctx", None)
    num_predict = given.pop("num_predict", None)
    if "stop" in given:
        given["stop"] = tuple(check_stop(given["stop"]))
    opts.update(given)
    ctx = entry.scheduler.context_length
    if o.num_ctx is not None:
        ctx = min(ctx, o.num_ctx)  # a smaller window than the server's is honoured; a larger one is clamped
    if prompt_len >= ctx:
        raise api_error_from(_ctx_error(prompt_len, ctx))
    room = ctx - prompt_len
    opts["max_tokens"] = room if num_predict in (None, -1, -2) else min(num_predict, room)
    opts["logprobs"] = logprobs
    opts["stop_ids"] = tuple(stop_ids)
    try:
        return SamplingParams(**opts).validate()
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param=f"options.{e.field}" if e.field else None) from None


def _ctx_error(n, ctx):
    from ..errors import ContextLengthError
    return ContextLengthError(n, ctx)


def _logprobs_n(logprobs: bool, top: int | None) -> int | None:
    check_int(top, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT)
    return (top or 0) if logprobs else None


def _json_mode(fmt) -> bool:
    if fmt in (None, ""):
        return False
    if fmt == "json" or isinstance(fmt, dict):
        return True
    raise bad_request(f"unsupported format {fmt!r}; use \"json\" or a JSON schema object", "format")


def _lp_items(tok, events) -> list[dict]:
    return [{"token": token_text(tok, t), "logprob": lp,
             "top_logprobs": [{"token": token_text(tok, i), "logprob": v} for i, v in (top or [])]}
            for t, lp, top in events]


# ------------------------------------------------------------------------------------------- load / unload
async def _load_or_unload(st, entry, model: str, keep_alive, chat: bool, t0: float):
    """Ollama's empty-prompt call: load (or with keep_alive 0, unload) the model and answer at once."""
    reason = "load"
    if keep_alive is not None and keep_alive == 0 and not entry.pinned:
        st.models.unload(entry.name)
        reason = "unload"
    body = {"model": model, "created_at": _now(), "done": True, "done_reason": reason,
            "total_duration": _ns(time.perf_counter() - t0)}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return json_response(body)


# ------------------------------------------------------------------------------------------------ generate
@router.post("/api/generate")
async def generate(request: Request):
    st, t0 = _state(request), time.perf_counter()
    req = await read_json(request, OllamaGenerateRequest)
    opts = _check_options(req.options)
    keep_alive = parse_keep_alive(req.keep_alive)
    json_mode = _json_mode(req.format)
    lp_n = _logprobs_n(req.logprobs, req.top_logprobs)
    if req.images:
        raise bad_request("this model does not support images", "images")
    if req.suffix:
        raise bad_request("'suffix' (fill-in-the-middle) is not supported", "suffix")
    loaded_before = st.models.find(req.model) is not None
    entry = await st.models.get(req.model, keep_alive)
    load_s = 0.0 if loaded_before else entry.load_seconds
    if not req.prompt and not req.context:
        return await _load_or_unload(st, entry, req.model, keep_alive, False, t0)
    stop_ids: tuple = ()
    if req.raw:
        ids = encode_raw(entry, req.prompt or "") if not req.context else \
            list(entry.lm.tokenizer.encode(req.prompt or ""))
    else:
        msgs = [{"role": "system", "content": req.system}] if req.system else []
        msgs.append({"role": "user", "content": req.prompt or ""})
        ids, stop_ids = encode_chat(entry, with_default_system(entry, msgs, json_mode))
        bos = entry.lm.tokenizer.bos_id
        if req.context and ids and ids[0] == bos:
            ids = ids[1:]  # the earlier context already starts with BOS
    prompt_ids = list(req.context or []) + ids
    vocab = int(entry.lm.config.vocab_size)
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise bad_request(f"'context' holds token ids outside the vocabulary (size {vocab})", "context")
    params = _sampling(entry, opts, len(prompt_ids), logprobs=lp_n, stop_ids=stop_ids)
    gen = Generation(entry, t0)
    choice = gen.submit(prompt_ids, params, json_processors(entry) if json_mode else None)
    tok = entry.lm.tokenizer

    def final(c) -> dict:
        r = c.stream.request
        body = {"model": req.model, "created_at": _now(), "response": "", "done": True,
                "done_reason": c.finish_reason, "context": list(r.prompt_ids) + list(c.token_ids)}
        body.update(_durations(gen, c, load_s))
        return body

    if req.stream:
        async def lines():
            async for c, ev, delta in gen.events():
                if ev.finish_reason == ERROR:
                    yield dumps({"error": c.error}) + b"\n"
                    return
                if delta or (lp_n is not None and ev.finish_reason is None):
                    part = {"model": req.model, "created_at": _now(), "response": delta, "done": False}
                    if lp_n is not None and ev.id >= 0:
                        part["logprobs"] = _lp_items(tok, [(ev.id, ev.logprob, ev.top_logprobs)])
                    yield dumps(part) + b"\n"
                if ev.finish_reason is not None:
                    yield dumps(final(c)) + b"\n"
        return StreamingEvents(lines(), "application/x-ndjson", gen.cancel)
    try:
        await until_disconnect(request, gen.run_to_end(), gen.cancel)
    except ClientGone:
        return json_response({}, 499)
    _raise_on_error(gen)
    body = final(choice)
    body["response"] = choice.text
    if lp_n is not None:
        body["logprobs"] = _lp_items(tok, choice.logprobs)
    return json_response(body)


def _raise_on_error(gen: Generation) -> None:
    err = gen.first_error()
    if err:
        raise ApiError(500, err)
    if any(c.finish_reason == SHUTDOWN for c in gen.choices):
        raise ApiError(503, "the server is shutting down", headers={"Retry-After": "1"})


def _durations(gen: Generation, c, load_s: float) -> dict:
    r = c.stream.request
    return {"total_duration": _ns(time.perf_counter() - gen.t_start), "load_duration": _ns(load_s),
            "prompt_eval_count": len(r.prompt_ids), "prompt_eval_duration": _ns(r.prompt_seconds),
            "eval_count": r.completion_tokens, "eval_duration": _ns(r.decode_seconds)}


# ---------------------------------------------------------------------------------------------------- chat
@router.post("/api/chat")
async def chat(request: Request):
    st, t0 = _state(request), time.perf_counter()
    req = await read_json(request, OllamaChatRequest)
    opts = _check_options(req.options)
    keep_alive = parse_keep_alive(req.keep_alive)
    json_mode = _json_mode(req.format)
    lp_n = _logprobs_n(req.logprobs, req.top_logprobs)
    if req.tools:
        raise bad_request("tools are not supported by this server", "tools")
    messages = []
    for i, m in enumerate(req.messages or []):
        role = check_role(m.role, f"messages[{i}].role")
        if m.images:
            raise bad_request("this model does not support images", f"messages[{i}].images")
        messages.append({"role": role, "content": m.content or ""})
    loaded_before = st.models.find(req.model) is not None
    entry = await st.models.get(req.model, keep_alive)
    load_s = 0.0 if loaded_before else entry.load_seconds
    if not messages:
        return await _load_or_unload(st, entry, req.model, keep_alive, True, t0)
    prompt_ids, stop_ids = encode_chat(entry, with_default_system(entry, messages, json_mode))
    params = _sampling(entry, opts, len(prompt_ids), logprobs=lp_n, stop_ids=stop_ids)
    gen = Generation(entry, t0)
    choice = gen.submit(prompt_ids, params, json_processors(entry) if json_mode else None)
    tok = entry.lm.tokenizer

    def final(c, content: str = "") -> dict:
        body = {"model": req.model, "created_at": _now(), "message": {"role": "assistant", "content": content},
                "done": True, "done_reason": c.finish_reason}
        body.update(_durations(gen, c, load_s))
        return body

    if req.stream:
        async def lines():
            async for c, ev, delta in gen.events():
                if ev.finish_reason == ERROR:
                    yield dumps({"error": c.error}) + b"\n"
                    return
                if delta or (lp_n is not None and ev.finish_reason is None):
                    part = {"model": req.model, "created_at": _now(),
                            "message": {"role": "assistant", "content": delta}, "done": False}
                    if lp_n is not None and ev.id >= 0:
                        part["logprobs"] = _lp_items(tok, [(ev.id, ev.logprob, ev.top_logprobs)])
                    yield dumps(part) + b"\n"
                if ev.finish_reason is not None:
                    yield dumps(final(c)) + b"\n"
        return StreamingEvents(lines(), "application/x-ndjson", gen.cancel)
    try:
        await until_disconnect(request, gen.run_to_end(), gen.cancel)
    except ClientGone:
        return json_response({}, 499)
    _raise_on_error(gen)
    body = final(choice, choice.text)
    if lp_n is not None:
        body["logprobs"] = _lp_items(tok, choice.logprobs)
    return json_response(body)


# ----------------------------------------------------------------------------------------------- embeddings
async def _embed(request, entry, items, truncate, dims):
    batch = tokenize_inputs(entry.lm, items, max_tokens=entry.scheduler.context_length, truncate=truncate)
    fut = entry.scheduler.run_job(lambda: embed_ids(entry.lm.model, batch, dims))
    try:
        vectors = await until_disconnect(request, asyncio.wrap_future(fut), fut.cancel)
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
    loaded_before = st.models.find(req.model) is not None
    entry = await st.models.get(req.model, parse_keep_alive(req.keep_alive))
    dims = check_dimensions(entry.lm, req.dimensions)
    try:
        vectors, n = await _embed(request, entry, items, req.truncate, dims)
    except ClientGone:
        return json_response({}, 499)
    return json_response({"model": req.model, "embeddings": vectors, "total_duration": _ns(time.perf_counter() - t0),
                          "load_duration": _ns(0 if loaded_before else entry.load_seconds),
                          "prompt_eval_count": n})


@router.post("/api/embeddings")
async def embeddings_legacy(request: Request):
    st = _state(request)
    req = await read_json(request, OllamaLegacyEmbeddingsRequest)
    entry = await st.models.get(req.model, parse_keep_alive(req.keep_alive))
    if not req.prompt:
        return json_response({"embedding": []})  # Ollama answers an empty prompt with an empty vector
    try:
        vectors, _ = await _embed(request, entry, [req.prompt], True, None)
    except ClientGone:
        return json_response({}, 499)
    return json_response({"embedding": vectors[0]})


# --------------------------------------------------------------------------------------------- model admin
def _store():
    from ..store import Store
    return Store()


def _short(name: str) -> str:
    return name[:-len(":latest")] if name.endswith(":latest") else name


def _param_size(cfg) -> str:
    C, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    qd, kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    n = V * C * (1 if cfg.tie_word_embeddings else 2) + L * (2 * C * qd + 2 * C * kd + 3 * C * I + 2 * C) + C
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}".replace(".0" + unit, unit)
    return str(n)


def _details(entry=None, fmt: str | None = None) -> dict:
    d = {"parent_model": "", "format": fmt or "", "family": "llama", "families": ["llama"],
         "parameter_size": "", "quantization_level": ""}
    if entry is not None:
        md = entry.lm.metadata or {}
        d.update(format=md.get("format", d["format"]), parameter_size=_param_size(entry.lm.config),
                 quantization_level=str(md.get("file_type") or ""))
    return d


def _file_size(lm) -> int:
    try:
        return lm.path.stat().st_size if lm.path is not None and lm.path.is_file() else 0
    except OSError:
        return 0


@router.get("/api/tags")
async def tags(request: Request):
    st = _state(request)
    rows = await asyncio.to_thread(lambda: _store().list())
    models, seen = [], set()
    for r in rows:
        short = _short(r.name)
        seen.add(short)
        models.append({"name": r.name, "model": r.name, "modified_at": _iso(r.modified), "size": r.size,
                       "digest": r.id, "details": _details(st.models.find(short), r.format)})
    for name, e in sorted(st.models.entries.items()):  # models served from a path are not in the store
        if _short(name) not in seen:
            models.append({"name": name, "model": name, "modified_at": _iso(e.loaded_wall), "size": _file_size(e.lm),
                           "digest": "", "details": _details(e)})
    return json_response({"models": models})


@router.get("/api/ps")
async def ps(request: Request):
    st = _state(request)
    models = [{"name": name, "model": name, "size": _file_size(e.lm), "digest": "", "details": _details(e),
               "expires_at": e.expiry_wall().isoformat().replace("+00:00", "Z"), "size_vram": 0,
               "context_length": e.scheduler.context_length}
              for name, e in sorted(st.models.entries.items())]
    return json_response({"models": models})


@router.get("/api/version")
async def version():
    return json_response({"version": __version__})


@router.post("/api/show")
async def show(request: Request):
    st = _state(request)
    req = await read_json(request, OllamaModelRequest)
    name = req.model_name()
    entry = st.models.find(name)
    defaults, fmt, modified = {}, "", None
    try:
        man = await asyncio.to_thread(lambda: _store().manifest(name))
        defaults, fmt = man.get("defaults") or {}, str(man.get("format", ""))
        modified = man.get("modified")
    except (ModelNotFoundError, StoreError):
        if entry is None:
            raise ApiError(404, f"model {name!r} not found") from None
    if entry is not None and not defaults:
        defaults = entry.lm.defaults or {}
    info = {"general.architecture": "llama"}
    template, license_ = defaults.get("template") or "", ""
    if entry is not None:
        cfg, md = entry.lm.config, entry.lm.metadata or {}
        info.update({"llama.context_length": entry.scheduler.context_length,
                     "llama.embedding_length": cfg.hidden_size, "llama.block_count": cfg.num_hidden_layers,
                     "llama.attention.head_count": cfg.num_attention_heads,
                     "llama.attention.head_count_kv": cfg.num_key_value_heads,
                     "llama.feed_forward_length": cfg.intermediate_size, "llama.vocab_size": cfg.vocab_size,
                     "llama.rope.freq_base": cfg.rope_theta})
        template = template or md.get("chat_template") or getattr(entry.lm.tokenizer, "chat_template", None) or ""
        license_ = md.get("license") or ""
    opts = defaults.get("options") or {}
    params = "\n".join(f"{k} {v}" for k, vs in opts.items() for v in (vs if isinstance(vs, list) else [vs]))
    modelfile = f"# Modelfile generated by llamaforge\nFROM {name}\n"
    if defaults.get("system"):
        modelfile += f'SYSTEM """{defaults["system"]}"""\n'
    modelfile += "".join(f"PARAMETER {line}\n" for line in params.splitlines())
    body = {"modelfile": modelfile, "parameters": params, "template": template, "license": license_,
            "details": _details(entry, fmt), "model_info": info, "capabilities": ["completion", "embedding"],
            "modified_at": _iso(float(modified)) if isinstance(modified, (int, float)) else _now()}
    if defaults.get("system"):
        body["system"] = defaults["system"]
    return json_response(body)


@router.post("/api/create")
async def create(request: Request):
    st = _state(request)
    req = await read_json(request, OllamaCreateRequest)
    name = req.model or req.name
    if not name:
        raise bad_request("missing field 'model'", "model")
    if not req.from_:
        raise bad_request("'from' (the base model) is required; uploading files is not supported", "from")
    if req.files or req.adapters or req.quantize:
        raise bad_request("creating from uploaded files, adapters or with quantize is not supported", "files")
    from ..store import _looks_like_model_path
    if _looks_like_model_path(req.from_):
        raise bad_request("'from' must name a model in the store, not a path", "from")
    try:
        created = await asyncio.to_thread(lambda: _store().create(
            name, req.from_, system=req.system, options=req.parameters, template=req.template))
    except ModelNotFoundError as e:
        raise ApiError(404, str(e)) from None
    except LlamaforgeError as e:
        raise ApiError(400, str(e)) from None
    old = st.models.find(created)
    if old is not None and not old.pinned:
        st.models.unload(old.name)  # the next request loads the new defaults
    statuses = [{"status": "using existing layers"}, {"status": "writing manifest"}, {"status": "success"}]
    if req.stream:
        async def lines():
            for s in statuses:
                yield dumps(s) + b"\n"
        return StreamingEvents(lines(), "application/x-ndjson", lambda: None)
    return json_response(statuses[-1])


@router.post("/api/copy")
async def copy(request: Request):
    data = await read_json(request, OllamaCopyRequest)
    try:
        await asyncio.to_thread(lambda: _store().copy(data.source, data.destination))
    except ModelNotFoundError as e:
        raise ApiError(404, str(e)) from None
    except LlamaforgeError as e:
        raise ApiError(400, str(e)) from None
    return json_response({})


@router.delete("/api/delete")
async def delete(request: Request):
    st = _state(request)
    req = await read_json(request, OllamaModelRequest)
    name = req.model_name()
    entry = st.models.find(name)
    if entry is not None and entry.pinned:
        raise bad_request(f"model {name!r} is being served (named at start); it cannot be deleted now", "model")
    try:
        await asyncio.to_thread(lambda: _store().remove(name))
    except ModelNotFoundError as e:
        raise ApiError(404, str(e)) from None
    except LlamaforgeError as e:
        raise ApiError(400, str(e)) from None
    if entry is not None:
        st.models.unload(entry.name)
    return json_response({})

