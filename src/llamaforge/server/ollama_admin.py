"""The Ollama dialect's model administration: /api/tags, /api/show, /api/ps, /api/version, /api/create,
/api/copy, /api/delete. Shapes follow Ollama's API docs; errors are {"error": "message"}."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request

from .. import __version__
from ..errors import LlamaforgeError, ModelNotFoundError, StoreError
from .common import StreamingEvents, dumps, json_response, read_json
from .models import display_name
from .schemas import ApiError, OllamaCopyRequest, OllamaCreateRequest, OllamaModelRequest, bad_request

router = APIRouter()


def _state(request: Request):
    return request.app.state.server


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _store():
    from ..store import Store
    return Store()


def _entry_path(entry):
    path = getattr(entry.lm, "path", None)
    return Path(path) if path is not None else None


def _file_size(path) -> int:
    try:
        if path is None:
            return 0
        p = Path(path)
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


def _store_ref(store, name: str):
    """The store's `Resolved` for a model name, or None when it is not one or cannot be read."""
    from ..store import parse_name
    try:
        # A ModelName, never the string: `resolve("x.gguf")` would look for a file of that name (an oracle).
        return store.resolve(parse_name(name))
    except (StoreError, OSError):
        return None


def _store_facts(store, name: str):
    """(weights path, manifest) of a store model, or (None, None)."""
    ref = _store_ref(store, name)
    return (ref.path, ref.manifest) if ref is not None else (None, None)


def _loaded_facts(store, entry) -> tuple[Path | None, str]:
    """(weights path, full sha256 digest) of a loaded model: its manifest's digest when it came from the store,
    else the sha256 of the file it was loaded from (computed once)."""
    from ..store import file_digest, manifest_digest
    if getattr(entry.lm, "name", None):
        path, man = _store_facts(store, str(entry.lm.name))
        if man is not None:
            return path, manifest_digest(man)
    path = _entry_path(entry)
    try:
        return path, file_digest(path) if path is not None else ""
    except OSError:
        return path, ""


def _tag_rows(st) -> list[dict]:
    from ..store import manifest_digest, model_details
    store = _store()
    models, seen = [], set()
    for r in store.list():
        path, man = _store_facts(store, r.name)
        seen.add(r.name)
        models.append({"name": r.name, "model": r.name, "modified_at": _iso(r.modified), "size": r.size,
                       "digest": manifest_digest(man) if man is not None else "",
                       "details": model_details(path, r.format)})
    for name, e in sorted(st.models.entries.items()):  # models served from a path are not in the store
        full = display_name(name)
        if full in seen:
            continue
        path, digest = _loaded_facts(store, e)
        models.append({"name": full, "model": full, "modified_at": _iso(e.loaded_wall), "size": _file_size(path),
                       "digest": digest, "details": model_details(path)})
    return models


@router.get("/api/tags")
async def tags(request: Request):
    """Every model (store, built-in, served from a path): full sha256 digest and header facts for each."""
    return json_response({"models": await asyncio.to_thread(_tag_rows, _state(request))})


def _ps_rows(st) -> list[dict]:
    from ..store import model_details
    store = _store()
    rows = []
    for name, e in sorted(st.models.entries.items()):
        path, digest = _loaded_facts(store, e)
        full = display_name(name)
        rows.append({"name": full, "model": full, "size": _file_size(path), "digest": digest,
                     "details": model_details(path), "size_vram": 0, "context_length": e.scheduler.context_length,
                     "expires_at": e.expiry_wall().isoformat().replace("+00:00", "Z")})
    return rows


@router.get("/api/ps")
async def ps(request: Request):
    return json_response({"models": await asyncio.to_thread(_ps_rows, _state(request))})


@router.get("/api/version")
async def version():
    return json_response({"version": __version__})


def _show_body(st, name: str) -> dict:
    from ..store import manifest_digest, model_details
    from ..store.inspect import inspect_cached
    from ..store.modelfile import render_modelfile, render_parameters
    store = _store()
    entry = st.models.find(name)
    ref = _store_ref(store, name)
    if ref is None and entry is None:
        raise ApiError(404, f"model {name!r} not found")
    defaults = dict(ref.defaults if ref is not None else (entry.lm.defaults or {}))
    path = ref.path if ref is not None else _entry_path(entry)
    fmt = str((ref.manifest or {}).get("format", "")) if ref is not None else ""
    try:
        head = inspect_cached(path) if path is not None else {}
    except (LlamaforgeError, OSError):
        head = {}
    info = {"general.architecture": head.get("architecture") or "llama",
            "general.parameter_count": head.get("parameters")}
    info.update({f"llama.{k}": head.get(h) for k, h in (("context_length", "context_length"),
                 ("embedding_length", "embedding_length"), ("block_count", "layers"), ("vocab_size", "vocab_size"))})
    if entry is not None:   # loaded: the numbers it runs with (its context is the engine's rows)
        cfg = entry.lm.config
        info.update({"llama.context_length": entry.scheduler.context_length,
                     "llama.embedding_length": cfg.hidden_size, "llama.block_count": cfg.num_hidden_layers,
                     "llama.attention.head_count": cfg.num_attention_heads,
                     "llama.attention.head_count_kv": cfg.num_key_value_heads,
                     "llama.feed_forward_length": cfg.intermediate_size, "llama.vocab_size": cfg.vocab_size,
                     "llama.rope.freq_base": cfg.rope_theta})
    info = {k: v for k, v in info.items() if v is not None}
    md = (entry.lm.metadata or {}) if entry is not None else {}
    template = defaults.get("template") or head.get("template") or md.get("chat_template") or \
        (getattr(entry.lm.tokenizer, "chat_template", None) if entry is not None else None) or ""
    license_ = defaults.get("license") or head.get("license") or md.get("license") or ""
    full = display_name(ref.name if ref is not None and ref.name else entry.name)
    modified = (ref.manifest or {}).get("modified") if ref is not None else None
    body = {"modelfile": render_modelfile(full, defaults), "parameters": render_parameters(defaults.get("options")),
            "template": template, "license": license_, "details": model_details(path, fmt), "model_info": info,
            "capabilities": ["completion", "embedding"],
            "modified_at": _iso(float(modified)) if isinstance(modified, (int, float)) else _now()}
    if ref is not None and ref.manifest is not None:
        body["digest"] = manifest_digest(ref.manifest)
    if defaults.get("system"):
        body["system"] = defaults["system"]
    if defaults.get("messages"):
        body["messages"] = defaults["messages"]
    return body


@router.post("/api/show")
async def show(request: Request):
    req = await read_json(request, OllamaModelRequest)
    return json_response(await asyncio.to_thread(_show_body, _state(request), req.model_name()))


def _create_status(stream: bool, statuses: list[dict]):
    if stream:
        async def lines():
            for s in statuses:
                yield dumps(s) + b"\n"
        return StreamingEvents(lines(), "application/x-ndjson", lambda: None)
    return json_response(statuses[-1])


@router.post("/api/create")
async def create(request: Request):
    """Ollama's create: a new model from a store model with SYSTEM / PARAMETER / TEMPLATE / MESSAGE / LICENSE
    fields (the same a Modelfile has). Files and adapters uploaded as blobs, and quantize, are refused by name."""
    st = _state(request)
    req = await read_json(request, OllamaCreateRequest)
    name = req.model or req.name
    if not name:
        raise bad_request("missing field 'model'", "model")
    for fld, what in (("files", "creating from uploaded files (/api/blobs)"),
                      ("adapters", "adapters uploaded as blobs (/api/blobs); create with `llamaforge create -f "
                                   "Modelfile` and an ADAPTER line on the server's machine"),
                      ("quantize", "quantize (re-quantizing on create); use `llamaforge convert`")):
        if getattr(req, fld):
            raise bad_request(f"'{fld}': {what} is not supported", fld, code="unsupported_field")
    if not req.from_:
        raise bad_request("'from' (the base model) is required", "from")
    from ..store import parse_name
    try:  # the base must be a store name, checked without touching the disk (no file-existence oracle)
        parse_name(req.from_)
    except StoreError:
        raise bad_request(f"'from' must name a model in the store; {req.from_!r} is not a model name",
                          "from") from None
    try:
        created = await asyncio.to_thread(lambda: _store().create(
            name, req.from_, system=req.system, options=req.parameters, template=req.template,
            messages=req.messages, license=req.license, from_name_only=True))
    except ModelNotFoundError as e:
        raise ApiError(404, str(e)) from None
    except LlamaforgeError as e:
        raise ApiError(400, str(e)) from None
    old = st.models.find(created)
    if old is not None and not old.pinned:
        await asyncio.to_thread(st.models.unload, old.name)  # the next request loads the new defaults
    return _create_status(req.stream, [{"status": "using existing layers"}, {"status": "writing manifest"},
                                       {"status": "success"}])


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

