"""Retrieval collections over HTTP (translation only; the work is `llamaforge.rag`'s):

    GET    /v1/rag/collections                       {"object": "list", "data": [collection info]}
    POST   /v1/rag/collections                       {"name", "embedder"?} -> 201 collection info (200 if it exists)
    GET    /v1/rag/collections/{name}                collection info with its documents
    DELETE /v1/rag/collections/{name}
    POST   /v1/rag/collections/{name}/documents      upload: JSON {"documents": [{"name", "text" | "data_base64"}]}
                                                     or the raw file as the body with ?filename=NAME
    POST   /v1/rag/collections/{name}/search         {"query", "k"?, "mode"?} -> {"object": "list", "data": [hits]}

Uploads are bounded by the server's body limit (413) and the per-file ingest limit; a file that cannot be read is
reported by name in the answer's "errors" while the others are ingested (422 when none could be). A missing
collection is 404; a bad name or field is 400 naming it.
"""
from __future__ import annotations

import base64
import binascii
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..errors import InvalidRequestError, StoreError
from ..rag import index as rag_index
from .common import json_response, read_json
from .schemas import ApiError
from .security import _BodyTooLarge

router = APIRouter()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateCollection(_Strict):
    name: str
    embedder: str | None = None


class UploadDocument(_Strict):
    name: str
    text: str | None = None
    data_base64: str | None = None


class UploadBody(_Strict):
    documents: list[UploadDocument] = Field(min_length=1, max_length=1000)


class SearchBody(_Strict):
    query: str
    k: int = 5
    mode: Literal["hybrid", "vector", "keyword"] = "hybrid"


def _api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, rag_index.CollectionNotFoundError):
        return ApiError(404, str(e), param="name", code="collection_not_found")
    if isinstance(e, StoreError):
        return ApiError(400, str(e), param="name", code="invalid_collection_name")
    if isinstance(e, rag_index.EmbedderMismatchError):
        return ApiError(409, str(e), code="embedder_mismatch")
    if isinstance(e, InvalidRequestError):
        return ApiError(400, str(e), param=e.field)
    raise e


async def _call(fn, *args, **kwargs):
    """Run blocking retrieval work off the event loop; map its errors to HTTP ones."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except Exception as e:
        raise _api_error(e) from None


def _info(name: str, with_documents: bool = False) -> dict:
    with rag_index.Index(name) as ix:
        docs = ix.documents()
        emb = ix.embedder or {}
        out = {"object": "rag.collection", "name": ix.name, "documents": len(docs), "chunks": ix.count_chunks(),
               "embedder": {k: emb.get(k) for k in ("name", "kind", "dim", "digest")} if emb else None}
        if with_documents:
            out["data"] = [{k: d[k] for k in ("source", "sha256", "kind", "title", "bytes", "chunks")}
                           for d in docs]
        return out


def _list() -> list[dict]:
    return [_info(n) for n in rag_index.list_collections()]


def _create(name: str, embedder: str | None) -> tuple[dict, bool]:
    from ..rag.embedders import get_embedder
    from ..rag.search import embedder_for
    name = rag_index.check_name(name)
    existed = rag_index.collection_path(name).exists()
    with rag_index.Index(name, create=True) as ix:
        emb = embedder_for(ix, embedder) or get_embedder(embedder)
        with ix.write():
            if ix.embedder is None:
                ix.set_embedder(emb.identity)
    return _info(name), not existed


@router.get("/v1/rag/collections")
async def list_collections():
    return json_response({"object": "list", "data": await _call(_list)})


@router.post("/v1/rag/collections")
async def create_collection(request: Request):
    body = await read_json(request, CreateCollection)
    info, created = await _call(_create, body.name, body.embedder)
    return json_response(info, 201 if created else 200)


@router.get("/v1/rag/collections/{name}")
async def get_collection(name: str):
    return json_response(await _call(_info, name, True))


@router.delete("/v1/rag/collections/{name}")
async def delete_collection(name: str):
    def drop():
        path = rag_index.collection_path(name)
        with rag_index.Index(name):
            pass   # 404 when missing
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return {"object": "rag.collection.deleted", "name": rag_index.check_name(name), "deleted": True}
    return json_response(await _call(drop))


def _ingest(name: str, files: list[tuple[str, bytes]]) -> dict:
    from ..rag.ingest import ingest_bytes
    with rag_index.Index(name):
        pass   # uploads go to an existing collection (create it with POST /v1/rag/collections)
    out = {"object": "rag.ingest", "collection": rag_index.check_name(name), "added": [], "updated": [],
           "unchanged": [], "chunks": 0, "errors": []}
    for fname, data in files:
        rep = ingest_bytes(name, fname, data).as_dict()
        for key in ("added", "updated", "unchanged", "errors"):
            out[key] += rep[key]
        out["chunks"] += rep["chunks"]
    return out


@router.post("/v1/rag/collections/{name}/documents")
async def upload_documents(name: str, request: Request):
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = await read_json(request, UploadBody)
        files = []
        for i, d in enumerate(body.documents):
            if (d.text is None) == (d.data_base64 is None):
                raise ApiError(400, f"documents[{i}] needs exactly one of 'text' and 'data_base64'",
                               param=f"documents[{i}]")
            if d.text is not None:
                files.append((d.name, d.text.encode("utf-8", "surrogatepass")))
            else:
                try:
                    files.append((d.name, base64.b64decode(d.data_base64, validate=True)))
                except (binascii.Error, ValueError):
                    raise ApiError(400, f"documents[{i}].data_base64 is not valid base64",
                                   param=f"documents[{i}].data_base64") from None
    else:
        filename = request.query_params.get("filename")
        if not filename:
            raise ApiError(400, "send JSON {\"documents\": [...]} or the raw file with ?filename=NAME",
                           param="filename")
        try:
            raw = await request.body()
        except _BodyTooLarge:
            raise ApiError(413, "request body is too large", code="body_too_large") from None
        files = [(filename, raw)]
    try:
        from ..rag.ingest import upload_name
        for fname, _ in files:
            upload_name(fname)
    except InvalidRequestError as e:
        raise ApiError(400, str(e), param="documents.name" if ctype == "application/json" else "filename") \
            from None
    report = await _call(_ingest, name, files)
    ok = report["added"] or report["updated"] or report["unchanged"]
    return json_response(report, 200 if ok or not report["errors"] else 422)


def _search(name: str, body: SearchBody) -> list[dict]:
    from ..rag.search import search
    return [h.as_dict() for h in search(name, body.query, body.k, mode=body.mode)]


@router.post("/v1/rag/collections/{name}/search")
async def search_collection(name: str, request: Request):
    body = await read_json(request, SearchBody)
    return json_response({"object": "list", "data": await _call(_search, name, body)})
