"""/v1/rag/... routes: collections listed, created, shown, deleted; uploads (JSON text, base64, raw body) with
per-file errors, size limits and 404 for a missing collection; search with the same results as the Python API."""
from __future__ import annotations

import base64

import pytest
from rag_support import install_demo
from starlette.testclient import TestClient
from test_rag_chunking import _pdf

from llamaforge.rag.search import search
from llamaforge.server.app import ServerConfig, create_app


@pytest.fixture()
def client():
    app = create_app(ServerConfig(max_body=64 * 1024, load_on_demand=False))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def test_collections_lifecycle_and_uploads(client):
    assert client.get("/v1/rag/collections").json() == {"object": "list", "data": []}
    r = client.post("/v1/rag/collections", json={"name": "KB"})
    assert r.status_code == 201 and r.json()["name"] == "kb" and r.json()["embedder"]["dim"] == 384
    assert client.post("/v1/rag/collections", json={"name": "kb"}).status_code == 200

    docs = [{"name": "ferry.md", "text": "# Ferry\n\nThe ferry is called the Grey Heron.\n"},
            {"name": "guide.pdf", "data_base64": base64.b64encode(_pdf(["The kettle holds 1.7 litres."])).decode()},
            {"name": "bad.txt", "data_base64": base64.b64encode(b"\x00\x01\x02binary").decode()}]
    r = client.post("/v1/rag/collections/kb/documents", json={"documents": docs})
    body = r.json()
    assert r.status_code == 200, body
    assert body["added"] == ["ferry.md", "guide.pdf"] and body["chunks"] == 2
    assert [e["source"] for e in body["errors"]] == ["bad.txt"] and "binary" in body["errors"][0]["error"]

    r = client.post("/v1/rag/collections/kb/documents?filename=notes.txt", content=b"The toll is seven coins.",
                    headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200 and r.json()["added"] == ["notes.txt"]
    again = client.post("/v1/rag/collections/kb/documents?filename=notes.txt", content=b"The toll is seven coins.",
                        headers={"content-type": "application/octet-stream"}).json()
    assert again["unchanged"] == ["notes.txt"] and again["chunks"] == 0

    info = client.get("/v1/rag/collections/kb").json()
    assert info["documents"] == 3 and sorted(d["source"] for d in info["data"]) == ["ferry.md", "guide.pdf",
                                                                                  "notes.txt"]
    r = client.post("/v1/rag/collections/kb/search", json={"query": "What is the ferry called?", "k": 2})
    hits = r.json()["data"]
    assert r.status_code == 200 and hits[0]["source"] == "ferry.md" and "Grey Heron" in hits[0]["text"]
    assert set(hits[0]) >= {"source", "text", "score", "chunk_id", "start", "end"}
    assert [h["chunk_id"] for h in hits] == [h.chunk_id for h in search("kb", "What is the ferry called?", 2)]

    assert client.delete("/v1/rag/collections/kb").json()["deleted"] is True
    assert client.get("/v1/rag/collections/kb").status_code == 404


def test_bad_requests(client, tmp_path_factory):
    install_demo(tmp_path_factory)
    cases = [
        ("post", "/v1/rag/collections", {"json": {"name": "../up"}}, 400, "name"),
        ("post", "/v1/rag/collections", {"json": {"name": "ok", "colour": "red"}}, 400, "colour"),
        ("post", "/v1/rag/collections/nope/search", {"json": {"query": "x"}}, 404, "name"),
        ("post", "/v1/rag/collections/demo/search", {"json": {"query": "x", "k": 0}}, 400, "k"),
        ("post", "/v1/rag/collections/demo/search", {"json": {"query": "x", "mode": "fuzzy"}}, 400, "mode"),
        ("post", "/v1/rag/collections/demo/search", {"json": {"query": "  "}}, 400, "query"),
        ("post", "/v1/rag/collections/demo/search", {"content": b"{not json", "headers": {
            "content-type": "application/json"}}, 400, None),
        ("post", "/v1/rag/collections/nope/documents", {"json": {"documents": [{"name": "a.txt", "text": "x"}]}},
         404, "name"),
        ("post", "/v1/rag/collections/demo/documents", {"json": {"documents": [{"name": "a.txt"}]}}, 400,
         "documents[0]"),
        ("post", "/v1/rag/collections/demo/documents", {"json": {"documents": [
            {"name": "a.txt", "data_base64": "***"}]}}, 400, "documents[0].data_base64"),
        ("post", "/v1/rag/collections/demo/documents", {"json": {"documents": [
            {"name": "../../a.txt\x00", "text": "x"}]}}, 400, "documents.name"),
        ("post", "/v1/rag/collections/demo/documents", {"content": b"x"}, 400, "filename"),
        ("post", "/v1/rag/collections/demo/documents?filename=big.txt", {"content": b"a" * 70_000}, 413, None),
        ("post", "/v1/rag/collections/demo/documents?filename=x.bin", {"content": b"abc"}, 422, None),
        ("delete", "/v1/rag/collections/nope", {}, 404, "name"),
        ("get", "/v1/rag/collections/a:b", {}, 400, "name"),
        ("get", "/v1/rag/collections/x%00y", {}, 400, "name"),
        ("get", "/v1/rag/collections/..%2Fetc", {}, 404, None),     # a path, never a collection name
    ]
    for method, url, kw, status, param in cases:
        r = getattr(client, method)(url, **kw)
        assert r.status_code == status, (url, kw, r.status_code, r.text)
        err = r.json().get("error")
        if status != 422:
            assert err and err["message"], r.text
            if param is not None:
                assert param in (err.get("param") or ""), (url, r.text)
    assert len(search("demo", "ferry", 50)) == len(search("demo", "ferry", 50))   # collection intact


def test_chat_routes_take_retrieval_and_return_citations(tmp_path_factory):
    """The `retrieval` extension field on OpenAI chat completions (official client, extra_body) and Ollama
    /api/chat: the sources reach the prompt and the citations come back beside the message."""
    from openai import OpenAI
    from test_rag_stage import tiny_chat_lm
    install_demo(tmp_path_factory)
    app = create_app(ServerConfig(load_on_demand=False), preloaded={"tiny": tiny_chat_lm()})
    with TestClient(app, base_url="http://127.0.0.1") as c:
        oa = OpenAI(base_url="http://127.0.0.1/v1", api_key="none", http_client=c)
        r = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Who founded Veltmark?"}],
                                       max_tokens=8, temperature=0, extra_body={"retrieval": {"collection": "demo",
                                                                                              "k": 2}})
        cits = r.choices[0].model_extra["citations"]
        assert [x["n"] for x in cits] == [1, 2] and cits[0]["source"].endswith("veltmark_history.md")
        assert r.usage.prompt_tokens > 300          # the passages are in the prompt (byte tokens)
        bad = c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                   "retrieval": {"collection": "missing", "k": 2}})
        assert bad.status_code in (400, 404) and "missing" in bad.json()["error"]["message"]
        o = c.post("/api/chat", json={"model": "tiny", "stream": False, "options": {"num_predict": 8},
                                      "messages": [{"role": "user", "content": "ferry name?"}],
                                      "retrieval": {"collection": "demo", "k": 3}}).json()
        assert [x["n"] for x in o["citations"]] == [1, 2, 3]
        assert o["citations"][0]["source"].endswith("harbour_ferry.md")
