"""The web chat page: `/ui` (the page and its static files) and `/ui/api/conversations...` (the stored chats).

The page itself is static and public (it holds no data; a browser cannot attach a key to a navigation), so
`/ui` and `/ui/static/*` are open like /health. Everything with data is behind the API key: the conversation
routes here and generation, which the page does through `/v1/chat/completions` like any other client (there is
no second generation path). Conversations belong to the key that sent the request (conversations.py).

    GET    /ui/api/conversations?q=TEXT&limit=N     -> {"conversations": [...]}   newest first, q searches
    POST   /ui/api/conversations                    {title?, model?, settings?, messages?} -> the conversation
    GET    /ui/api/conversations/{id}               -> {id, title, model, settings, ..., messages: [...]}
    PATCH  /ui/api/conversations/{id}               {title?, model?, settings?} -> the conversation
    DELETE /ui/api/conversations/{id}               -> {"deleted": id}
    POST   /ui/api/conversations/{id}/messages      {messages: [{role, content, meta?}], replace_from?}
"""
from __future__ import annotations

import asyncio
import hashlib
import mimetypes
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from .._fs import read_bounded, loads_json
from ..errors import InvalidRequestError, LlamaforgeError
from .common import json_response
from .conversations import ConversationNotFoundError, ConversationStore, ConversationStoreError
from .schemas import ApiError, bad_request
from .security import _BodyTooLarge, presented_key

router = APIRouter()
STATIC = Path(__file__).resolve().parent / "static"
MAX_STATIC_FILE = 4 * 1024 * 1024
# Scripts and styles only from this server, nothing inline, no plugins, no framing, no outside connections:
# even markup that got past the sanitizer could neither run nor phone home.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
         ".png": "image/png", ".json": "application/json", ".txt": "text/plain; charset=utf-8",
         ".md": "text/plain; charset=utf-8"}


# ------------------------------------------------------------------------------------------------- the page
@router.get("/ui")
async def ui_page(request: Request):
    return _static_response(request, "index.html")


@router.get("/ui/")
async def ui_page_slash():
    return RedirectResponse("/ui", status_code=308)


@router.get("/ui/static/{path:path}")
async def ui_static(path: str, request: Request):
    return _static_response(request, path)


def _static_response(request: Request, rel: str) -> Response:
    found = _static_file(rel)
    if found is None:
        raise ApiError(404, f"no file {rel!r} in the web UI")
    body, media_type, etag = found
    # Revalidated on every load (the files change with the package), answered 304 while unchanged.
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": etag}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@lru_cache(maxsize=128)
def _static_file(rel: str) -> tuple[bytes, str, str] | None:
    """The bytes, type and ETag of a file under static/, or None (outside static/, hidden, unknown type,
    missing)."""
    parts = rel.split("/")
    if not rel or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        return None
    path = (STATIC / rel).resolve()
    if STATIC not in path.parents or not path.is_file():
        return None
    media_type = TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0]
    if media_type is None:
        return None
    try:
        body = read_bounded(path, MAX_STATIC_FILE, "web UI file")
    except LlamaforgeError:
        return None
    return body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


# ---------------------------------------------------------------------------------------------- conversations
def _store(request: Request) -> ConversationStore:
    state = request.app.state
    store = getattr(state, "ui_conversations", None)
    if store is None:
        store = state.ui_conversations = ConversationStore()
    return store


def _owner(request: Request, store: ConversationStore) -> str:
    # The security middleware already checked the key; the owner is whichever valid key was presented.
    configured = getattr(request.app.state.server.config, "api_key", None)
    if not configured:
        return store.owner_for(None)
    return store.owner_for(presented_key({k.lower(): v for k, v in request.headers.items()}))


async def _run(fn, *args):
    """A store call off the event loop, its errors as HTTP errors naming the field."""
    try:
        return await asyncio.to_thread(fn, *args)
    except ConversationNotFoundError as e:
        raise ApiError(404, str(e), code="conversation_not_found") from None
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param=e.field) from None
    except ConversationStoreError as e:
        raise ApiError(500, str(e), type="server_error", code="conversation_store_error") from None


async def _read_object(request: Request) -> dict:
    try:
        raw = await request.body()
    except _BodyTooLarge:
        raise ApiError(413, "request body is too large", code="body_too_large") from None
    if not raw.strip():
        raise bad_request("request body is empty; expected a JSON object")
    try:
        data = loads_json(raw.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as e:
        raise bad_request(f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    except ValueError as e:
        raise bad_request(f"malformed JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("malformed JSON: nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def _no_constants(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _query_params(request: Request, allowed: set[str]) -> dict[str, str]:
    params = dict(request.query_params)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise bad_request(f"unknown query parameter {unknown[0]!r} (known: {', '.join(sorted(allowed))})",
                          unknown[0])
    return params


@router.get("/ui/api/conversations")
async def list_conversations(request: Request):
    params = _query_params(request, {"q", "limit"})
    limit = params.get("limit", "200")
    if not limit.isdigit():
        raise bad_request("'limit' must be a positive integer", "limit")
    store = _store(request)
    rows = await _run(store.list, _owner(request, store), params.get("q"), int(limit))
    return json_response({"conversations": rows})


@router.post("/ui/api/conversations")
async def create_conversation(request: Request):
    body = await _read_object(request)
    store = _store(request)
    return json_response(await _run(store.create, _owner(request, store), body), 201)


@router.get("/ui/api/conversations/{cid}")
async def get_conversation(cid: str, request: Request):
    store = _store(request)
    return json_response(await _run(store.get, _owner(request, store), cid))


@router.patch("/ui/api/conversations/{cid}")
async def update_conversation(cid: str, request: Request):
    body = await _read_object(request)
    store = _store(request)
    return json_response(await _run(store.update, _owner(request, store), cid, body))


@router.delete("/ui/api/conversations/{cid}")
async def delete_conversation(cid: str, request: Request):
    store = _store(request)
    await _run(store.delete, _owner(request, store), cid)
    return json_response({"deleted": cid})


@router.post("/ui/api/conversations/{cid}/messages")
async def write_messages(cid: str, request: Request):
    body = await _read_object(request)
    unknown = sorted(set(body) - {"messages", "replace_from"})
    if unknown:
        raise bad_request(f"unknown field {unknown[0]!r} (known: messages, replace_from)", unknown[0])
    store = _store(request)
    return json_response(await _run(store.write_messages, _owner(request, store), cid, body.get("messages"),
                                    body.get("replace_from")))
