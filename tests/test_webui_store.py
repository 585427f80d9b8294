"""The web UI's server side: the page and its files at /ui, and the conversation store behind
/ui/api/conversations (create, list, get, rename, delete, search, isolation per API key, restart, bad input).

No model is loaded: these routes never generate (the page generates through /v1/chat/completions)."""
from __future__ import annotations

import importlib.util
import json
import sqlite3
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llamaforge.server import conversations as conv_mod
from llamaforge.server.app import ServerConfig, create_app
from llamaforge.server.conversations import ConversationStore, ConversationStoreError

ROOT = Path(__file__).resolve().parent.parent
API = "/ui/api/conversations"


def client(api_key=None) -> TestClient:
    return TestClient(create_app(ServerConfig(api_key=api_key), preloaded={}), base_url="http://127.0.0.1:11435")


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def c():
    with client() as tc:
        yield tc


# ------------------------------------------------------------------------------------------------- the page
class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, dict]] = []
        self.text_of_button: list[str] = []
        self._in_button = False

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))
        self._in_button = tag == "button"

    def handle_data(self, data):
        if self._in_button and data.strip():
            self.text_of_button.append(data.strip())


def test_page_is_served_with_the_accessible_contract_and_a_strict_policy(c):
    assert c.get("/").text == "llamaforge is running"          # what Ollama clients probe
    r = c.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    p = _Elements()
    p.feed(r.text)
    assert ("textarea", {"id": "prompt", "aria-label": "Message", "rows": "1",
                         "placeholder": "Message (Enter to send, Shift+Enter for a new line)",
                         "maxlength": "1000000"}) in p.found
    assert "Send" in p.text_of_button and "Stop" in p.text_of_button
    assert any(t == "nav" and a.get("aria-label") == "Conversations" for t, a in p.found)
    # Everything the page loads comes from this server (no CDN): every src/href is a /ui/static path.
    refs = [a.get("src") or a.get("href") for t, a in p.found if t in ("script", "link")]
    assert refs and all(r.startswith("/ui/static/") for r in refs), refs
    assert c.get("/ui/").status_code == 200                     # redirected to /ui


def test_static_files_types_etags_and_no_escape(c):
    r = c.get("/ui/static/js/main.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert c.get("/ui/static/vendor/purify.es.mjs").headers["content-type"].startswith("text/javascript")
    assert c.get("/ui/static/app.css").headers["content-type"].startswith("text/css")
    again = c.get("/ui/static/js/main.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    for bad in ("/ui/static/../conversations.py", "/ui/static/%2e%2e/conversations.py", "/ui/static/",
                "/ui/static/js/../../ui_routes.py", "/ui/static/.hidden", "/ui/static/nope.js",
                "/ui/static/js%5cmain.js", "/ui/static/%00"):
        resp = c.get(bad)
        assert resp.status_code == 404, bad
        assert "import" not in resp.text


def test_vendored_libraries_match_their_manifest_and_carry_licences():
    spec = importlib.util.spec_from_file_location("build_webui", ROOT / "scripts" / "build_webui.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.check() == []
    manifest = json.loads((mod.VENDOR / "VENDOR.json").read_text())
    names = {p["name"]: p for p in manifest["packages"]}
    assert {"marked", "dompurify", "@highlightjs/cdn-assets"} <= set(names)
    lock = json.loads((ROOT / "webui" / "package-lock.json").read_text())["packages"]
    for name, p in names.items():   # the committed copies are the locked versions
        assert lock[f"node_modules/{name}"]["version"] == p["version"], name
        assert p["license"] and p["license_files"]


def test_package_data_ships_the_static_tree():
    import tomllib
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["llamaforge"]
    static = ROOT / "src" / "llamaforge" / "server" / "static"
    pkg = ROOT / "src" / "llamaforge"
    shipped = {f for pat in patterns for f in pkg.glob(pat) if f.is_file()}
    missing = [str(f.relative_to(static)) for f in static.rglob("*") if f.is_file() and f not in shipped]
    assert not missing, f"not in package-data: {missing}"


# ------------------------------------------------------------------------------------------ conversations
def test_create_list_get_rename_settings_delete(c):
    r = c.post(API, json={"title": "  Trip   to Lisbon ", "model": "smollm2",
                          "settings": {"temperature": 0.7, "system": "Be brief.", "seed": 3, "json_mode": False},
                          "messages": [{"role": "user", "content": "Where should I eat?"}]})
    assert r.status_code == 201
    conv = r.json()
    assert conv["title"] == "Trip to Lisbon" and conv["model"] == "smollm2" and conv["message_count"] == 1
    assert conv["settings"] == {"temperature": 0.7, "system": "Be brief.", "seed": 3, "json_mode": False}
    cid = conv["id"]
    second = c.post(API, json={}).json()
    assert second["title"] == "New chat" and second["messages"] == []

    listed = c.get(API).json()["conversations"]
    assert [x["id"] for x in listed] == [second["id"], cid]     # newest first

    w = c.post(f"{API}/{cid}/messages", json={"messages": [
        {"role": "assistant", "content": "Try the **bifanas**.", "meta": {"usage": {"completion_tokens": 5}}}]})
    assert w.status_code == 200 and w.json()["message_count"] == 2
    assert [m["content"] for m in w.json()["written"]] == ["Try the **bifanas**."]
    assert [x["id"] for x in c.get(API).json()["conversations"]][0] == cid   # written to: now the newest

    got = c.get(f"{API}/{cid}").json()
    assert [(m["role"], m["content"]) for m in got["messages"]] == [("user", "Where should I eat?"),
                                                                     ("assistant", "Try the **bifanas**.")]
    assert got["messages"][1]["meta"] == {"usage": {"completion_tokens": 5}}

    r = c.patch(f"{API}/{cid}", json={"title": "Lisbon food", "settings": {"top_p": 0.9}})
    assert r.status_code == 200 and r.json()["title"] == "Lisbon food" and r.json()["settings"] == {"top_p": 0.9}
    assert len(r.json()["messages"]) == 2

    assert c.delete(f"{API}/{cid}").json() == {"deleted": cid}
    assert c.get(f"{API}/{cid}").status_code == 404
    assert c.delete(f"{API}/{cid}").status_code == 404
    assert [x["id"] for x in c.get(API).json()["conversations"]] == [second["id"]]


def test_regenerate_and_edit_replace_the_tail_in_one_write(c):
    cid = c.post(API, json={"messages": [{"role": "user", "content": f"m{i}"} if i % 2 == 0 else
                                         {"role": "assistant", "content": f"m{i}"} for i in range(4)]}).json()["id"]
    # regenerate: drop the last answer, write the new one
    r = c.post(f"{API}/{cid}/messages", json={"messages": [{"role": "assistant", "content": "new"}],
                                              "replace_from": 3})
    assert r.json()["message_count"] == 4
    # edit-and-resend at message 2: it and everything after it go
    c.post(f"{API}/{cid}/messages", json={"messages": [{"role": "user", "content": "edited"}], "replace_from": 2})
    assert [m["content"] for m in c.get(f"{API}/{cid}").json()["messages"]] == ["m0", "m1", "edited"]
    # delete only (regenerate starts by removing the old answer)
    c.post(f"{API}/{cid}/messages", json={"messages": [], "replace_from": 1})
    assert [m["content"] for m in c.get(f"{API}/{cid}").json()["messages"]] == ["m0"]
    r = c.post(f"{API}/{cid}/messages", json={"messages": [], "replace_from": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "replace_from"


def test_search_titles_and_message_text_case_insensitively(c):
    a = c.post(API, json={"title": "Garden plans", "messages": [{"role": "user", "content": "Tomatoes or beans?"}]})
    b = c.post(API, json={"title": "Physics", "messages": [
        {"role": "user", "content": "Explain the photoelectric effect."},
        {"role": "assistant", "content": "Light knocks electrons out of a metal: see the ÉCOLE notes."}]})
    c.post(API, json={"title": "Empty"})
    ids = lambda q: [x["id"] for x in c.get(API, params={"q": q}).json()["conversations"]]  # noqa: E731
    assert ids("garden") == [a.json()["id"]]
    assert ids("ELECTRONS") == [b.json()["id"]]
    assert ids("école") == [b.json()["id"]]                     # Unicode case folding, not ASCII only
    assert ids("no such words") == []
    hit = c.get(API, params={"q": "electrons"}).json()["conversations"][0]
    assert "electrons" in hit["match"].lower() and len(hit["match"]) < 200
    assert ids("%") == [] and ids("_") == []                     # no LIKE wildcards
    assert len(ids("")) == 3


@pytest.mark.parametrize("method, path, body, status, param", [
    ("post", API, {"titel": "x"}, 400, "titel"),
    ("post", API, {"title": 5}, 400, "title"),
    ("post", API, {"title": "x" * 201}, 400, "title"),
    ("post", API, {"settings": {"temperature": 3}}, 400, "settings.temperature"),
    ("post", API, {"settings": {"temperature": True}}, 400, "settings.temperature"),
    ("post", API, {"settings": {"top_p": 0}}, 400, "settings.top_p"),
    ("post", API, {"settings": {"max_tokens": 1.5}}, 400, "settings.max_tokens"),
    ("post", API, {"settings": {"colour": "red"}}, 400, "settings.colour"),
    ("post", API, {"settings": {"retrieval": {"collection": ""}}}, 400, "settings.retrieval.collection"),
    ("post", API, {"settings": {"retrieval": {"collection": "docs", "k": 0}}}, 400, "settings.retrieval.k"),
    ("post", API, {"settings": []}, 400, "settings"),
    ("post", API, {"messages": [{"role": "system", "content": "x"}]}, 400, "messages[0].role"),
    ("post", API, {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("post", API, {"messages": [{"role": "user", "content": "a", "name": "b"}]}, 400, "messages[0].name"),
    ("post", API, {"messages": [{"role": "user", "content": "a\x00b"}]}, 400, "messages[0].content"),
    ("post", API, {"messages": [{"role": "user", "content": "a", "meta": []}]}, 400, "messages[0].meta"),
    ("post", API, {"messages": "hello"}, 400, "messages"),
])
def test_bad_fields_are_refused_naming_the_field(c, method, path, body, status, param):
    r = getattr(c, method)(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert c.get(API).json()["conversations"] == []             # nothing half-written


def test_bad_bodies_ids_and_query_parameters(c):
    raw = {"Content-Type": "application/json"}
    for body, code in ((b"{", "invalid_json"), (b"[1]", "invalid_json"), (b"\xff\xfe", "invalid_utf8"),
                       (b'{"title": NaN}', "invalid_json"), (b"", None)):
        r = c.post(API, content=body, headers=raw)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, body
    r = c.post(API, content=b'{"title": "\\ud800"}', headers=raw)   # lone surrogate
    assert r.status_code == 400 and r.json()["error"]["param"] == "title"
    r = c.post(API, content=b'{"title": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=raw)
    assert r.status_code == 400
    for bad_id in ("nope", "0" * 32, "../../etc", "A" * 32):
        assert c.get(f"{API}/{bad_id}").status_code == 404
        assert c.post(f"{API}/{bad_id}/messages", json={"messages": []}).status_code == 404
    assert c.get(API, params={"sort": "x"}).json()["error"]["param"] == "sort"
    assert c.get(API, params={"limit": "-1"}).status_code == 400
    assert c.get(API, params={"limit": "100000"}).json()["error"]["param"] == "limit"
    assert c.get(API, params={"q": "x" * 201}).json()["error"]["param"] == "q"
    cid = c.post(API, json={}).json()["id"]
    r = c.post(f"{API}/{cid}/messages", json={"messages": [], "extra": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "extra"
    assert c.patch(f"{API}/{cid}", json={"messages": []}).json()["error"]["param"] == "messages"


def test_size_limits(c, monkeypatch):
    monkeypatch.setattr(conv_mod, "MAX_CONTENT", 50)
    monkeypatch.setattr(conv_mod, "MAX_MESSAGES", 3)
    monkeypatch.setattr(conv_mod, "MAX_META_BYTES", 100)
    monkeypatch.setattr(conv_mod, "MAX_CONVERSATIONS", 2)
    cid = c.post(API, json={}).json()["id"]
    msg = lambda text, **kw: {"role": "user", "content": text, **kw}  # noqa: E731
    assert c.post(f"{API}/{cid}/messages", json={"messages": [msg("x" * 51)]}).status_code == 400
    r = c.post(f"{API}/{cid}/messages", json={"messages": [msg("x", meta={"a": "y" * 200})]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].meta"
    assert c.post(f"{API}/{cid}/messages", json={"messages": [msg("a"), msg("b"), msg("c")]}).status_code == 200
    r = c.post(f"{API}/{cid}/messages", json={"messages": [msg("d")]})
    assert r.status_code == 400 and "at most 3 messages" in r.json()["error"]["message"]
    assert len(c.get(f"{API}/{cid}").json()["messages"]) == 3   # the refused write left nothing behind
    c.post(API, json={})
    assert c.post(API, json={}).status_code == 400              # MAX_CONVERSATIONS per owner


# ----------------------------------------------------------------------------------------- keys, restarts
def test_each_key_sees_only_its_own_conversations():
    with client(api_key=["key-alpha", "key-beta"]) as tc:
        assert tc.get(API).status_code == 401                    # the data needs a key...
        assert tc.get("/ui").status_code == 200                  # ...the page and its files do not
        assert tc.get("/ui/static/js/main.js").status_code == 200
        assert tc.get(API, headers=bearer("key-gamma")).status_code == 401
        a, b = bearer("key-alpha"), {"X-API-Key": "key-beta"}
        cid = tc.post(API, json={"title": "alpha's secret plan", "messages": [
            {"role": "user", "content": "the password is swordfish"}]}, headers=a).json()["id"]
        assert tc.get(API, headers=b).json()["conversations"] == []
        assert tc.get(API, params={"q": "swordfish"}, headers=b).json()["conversations"] == []
        for resp in (tc.get(f"{API}/{cid}", headers=b), tc.patch(f"{API}/{cid}", json={"title": "mine"}, headers=b),
                     tc.post(f"{API}/{cid}/messages", json={"messages": []}, headers=b),
                     tc.delete(f"{API}/{cid}", headers=b)):
            assert resp.status_code == 404 and "not found" in resp.json()["error"]["message"]
        got = tc.get(f"{API}/{cid}", headers=a).json()
        assert got["title"] == "alpha's secret plan" and len(got["messages"]) == 1
        tc.post(API, json={"title": "beta's"}, headers=b)
        assert [x["title"] for x in tc.get(API, headers=a).json()["conversations"]] == ["alpha's secret plan"]
        db = tc.app.state.ui_conversations.path
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert b"key-alpha" not in raw and b"key-beta" not in raw     # only HMACs of keys are stored


def test_conversations_survive_a_restart_and_a_new_key_starts_empty():
    with client(api_key="k1") as first:
        cid = first.post(API, json={"title": "kept", "messages": [{"role": "user", "content": "hello"}]},
                         headers=bearer("k1")).json()["id"]
        first.post(f"{API}/{cid}/messages", json={"messages": [{"role": "assistant", "content": "hi!"}]},
                   headers=bearer("k1"))
    with client(api_key="k1") as again:                          # a new app, a new store object, same file
        got = again.get(f"{API}/{cid}", headers=bearer("k1")).json()
        assert got["title"] == "kept" and [m["content"] for m in got["messages"]] == ["hello", "hi!"]
    with client(api_key="k2") as other:
        assert other.get(API, headers=bearer("k2")).json()["conversations"] == []
    with client() as keyless:                                    # no keys: the "local" owner, also separate
        assert keyless.get(API).json()["conversations"] == []


def test_concurrent_writers_keep_every_message(tmp_path):
    store = ConversationStore(tmp_path / "c.sqlite3")
    owner = store.owner_for("k")
    cid = store.create(owner, {})["id"]
    errors = []

    def writer(n):
        try:
            for i in range(10):
                store.write_messages(owner, cid, [{"role": "user", "content": f"{n}-{i}"}])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    contents = [m["content"] for m in store.get(owner, cid)["messages"]]
    assert sorted(contents) == sorted(f"{n}-{i}" for n in range(4) for i in range(10))


def test_unusable_database_files_give_a_named_error(tmp_path):
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConversationStoreError, match="unusable|not a database"):
        ConversationStore(junk).list("local")
    newer = tmp_path / "newer.sqlite3"
    ConversationStore(newer).list("local")
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(ConversationStoreError, match="newer llamaforge"):
        ConversationStore(newer).list("local")


def test_a_broken_store_is_a_500_with_its_reason(c, tmp_path):
    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"garbage" * 1000)
    c.app.state.ui_conversations = ConversationStore(bad)
    r = c.get(API)
    assert r.status_code == 500 and r.json()["error"]["code"] == "conversation_store_error"
    assert "bad.sqlite3" in r.json()["error"]["message"]


def test_serve_accepts_several_api_keys():
    from llamaforge.cli.serve import build_parser
    args = build_parser().parse_args(["--api-key", "a", "--api-key", "b"])
    assert args.api_key == ["a", "b"]
