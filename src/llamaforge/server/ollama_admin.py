"""The Ollama dialect's model administration: /api/tags, /api/show, /api/ps, /api/version, /api/create,
/api/copy, /api/delete. Shapes follow Ollama's API docs; errors are {"error": "message"}."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from fastapi import APIRouter
from starlette.requests import Request

from .. import __version__
from ..errors import LlamaforgeError, ModelNotFoundError, StoreError
from .common import StreamingEvents, dumps, json_response, read_json
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
    from ..store import parse_name
    try:  # the base must be a store name, checked without touching the disk (no file-existence oracle)
        parse_name(req.from_)
    except StoreError:
        raise bad_request(f"'from' must name a model in the store; {req.from_!r} is not a model name",
                          "from") from None
    try:
        created = await asyncio.to_thread(lambda: _store().create(
            name, req.from_, system=req.system, options=req.parameters, template=req.template,
            from_name_only=True))
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

