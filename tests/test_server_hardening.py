"""Hostile clients against a live server (a tiny random model, so each case is fast): slow headers, idle and
too many connections, CORS preflights, non-ASCII keys, absurd keep_alive values and number literals, abandoned
embedding jobs, streams cut by unloading. Every case ends in a clean answer or a closed socket, and the server
keeps serving."""
from __future__ import annotations

import argparse
import json
import socket
import time

import httpx
import pytest

from llamaforge.errors import LlamaforgeError
from llamaforge.server.app import ServerConfig, create_app
from test_generate_support import tiny_lm
from test_server_e2e import Running

KEY = "clé-секрет-🔑"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm(context=4096)


@pytest.fixture(scope="module")
def srv(lm):
    r = Running(create_app(ServerConfig(max_batch=2, header_timeout=1.0, keep_alive_timeout=1.0, max_connections=12,
                                        allowed_origins=["https://app.example"]), preloaded={"tiny": lm}))
    yield r
    r.stop()


def _health(url) -> int:
    return httpx.get(url + "/health", timeout=5).status_code


def _closed(sock, within: float) -> bool:
    """True when the server closes `sock` within `within` seconds (whatever it still sends first)."""
    deadline = time.monotonic() + within
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            if sock.recv(65536) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_slow_headers_are_cut_off_while_the_server_keeps_serving(srv):
    s = socket.create_connection(("127.0.0.1", srv.port))
    t0 = time.monotonic()
    try:
        for ch in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ":
            try:
                s.send(bytes([ch]))
            except OSError:
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > 4:
                break
        assert _closed(s, 3.0)
        assert time.monotonic() - t0 < 5.0  # the 1 s deadline held although bytes kept coming
    finally:
        s.close()
    assert _health(srv.url) == 200


def test_silent_connections_are_closed_and_the_cap_keeps_health_answering(srv):
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(30)]
    try:
        for _ in range(3):  # well over the cap of 12: the oldest waiting ones are evicted for newcomers
            assert _health(srv.url) == 200
        time.sleep(1.5)
        assert sum(_closed(s, 0.5) for s in socks) == len(socks)  # every silent one is gone by its deadline
    finally:
        for s in socks:
            s.close()
    assert _health(srv.url) == 200


def test_idle_keep_alive_connection_is_closed(srv):
    s = socket.create_connection(("127.0.0.1", srv.port))
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(5)
        assert b"200" in s.recv(4096).split(b"\r\n", 1)[0]
        assert _closed(s, 4.0)  # keep-alive 1 s (+ the header deadline)
    finally:
        s.close()


def test_cors_preflight_and_response_headers(srv):
    pre = httpx.options(srv.url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = httpx.get(srv.url + "/v1/models", headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    bad = httpx.options(srv.url + "/v1/models", headers={"Origin": "https://evil.example",
                                                         "Access-Control-Request-Method": "GET"})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers


def test_non_ascii_api_key(lm):
    r = Running(create_app(ServerConfig(api_key=KEY), preloaded={"tiny": lm}))
    try:
        def get(key: str):
            raw = ("Bearer " + key).encode("utf-8")  # what a client sends: UTF-8 bytes in the header
            return httpx.get(r.url + "/v1/models", headers=[(b"authorization", raw)])
        assert get(KEY).status_code == 200
        assert get(KEY + "x").status_code == 401
        assert get("cle-sekret").status_code == 401
    finally:
        r.stop()


def test_api_key_file(tmp_path):
    from llamaforge.cli.serve import _api_key
    f = tmp_path / "key"
    f.write_text(KEY + "\n", encoding="utf-8")
    ns = argparse.Namespace(api_key=None, api_key_file=str(f))
    assert _api_key(ns) == KEY
    f.write_text("", encoding="utf-8")
    with pytest.raises(LlamaforgeError, match="empty"):
        _api_key(ns)
    with pytest.raises(LlamaforgeError, match="not both"):
        _api_key(argparse.Namespace(api_key="k", api_key_file=str(f)))


@pytest.mark.parametrize("value, status", [
    ("nan", 400), ("inf", 400), (1e308, 200), ("99999999999h", 200), ("-5m", 200), ("1e999", 400),
    ("5" * 100, 400), ("3x", 400),
])
def test_absurd_keep_alive_never_breaks_ps(srv, value, status):
    r = httpx.post(srv.url + "/api/embed", json={"model": "tiny", "input": "a", "keep_alive": value})
    assert r.status_code == status, r.text
    assert httpx.get(srv.url + "/api/ps").status_code == 200


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"model": "tiny", "prompt": "x", "seed": -' + b"7" * 5000 + b"}",
    b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}',
    b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}",
])
def test_absurd_numbers_and_nesting_are_400(srv, body):
    r = httpx.post(srv.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert _health(srv.url) == 200


def test_a_huge_prompt_is_refused_before_tokenizing(srv, lm):
    text = "x" * (3 * 1024 * 1024)
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": text}, timeout=30)
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5


def test_abandoned_embedding_job_stops(srv):
    sched = srv.app.state.server.models.entries["tiny"].scheduler
    body = {"model": "tiny", "input": ["word " * 700] * 400}
    try:
        httpx.post(srv.url + "/v1/embeddings", json=body, timeout=0.5)
    except httpx.TimeoutException:
        pass
    deadline = time.monotonic() + 10
    while sched.busy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sched.busy  # the job noticed the client was gone between inputs
    assert _health(srv.url) == 200


def test_stream_cut_by_unloading_says_so(lm):
    r = Running(create_app(ServerConfig(max_batch=2, load_on_demand=False), preloaded={"tiny": lm}))
    try:
        body = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 3000, "stream": True,
                "temperature": 0}
        lines = []
        with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=30) as resp:
            it = resp.iter_lines()
            for line in it:
                lines.append(line)
                if line.startswith("data: {"):
                    break
            r.app.state.server.models.unload("tiny")
            lines += list(it)
        data = [x for x in lines if x.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        err = json.loads(data[-2][6:])["error"]
        assert "unloaded" in err["message"]
        assert not any('"finish_reason":"stop"' in x for x in data)
    finally:
        r.stop()


@pytest.mark.parametrize("existing, missing", [
    ("~/.bashrc-probe", "~/.no-such-file-probe"),
    ("{tmp}/real.gguf", "{tmp}/absent.gguf"),
    ("../{tmpname}/real.gguf", "../{tmpname}/absent.gguf"),
    ("real.gguf", "absent.gguf"),
])
def test_refusals_never_reveal_whether_a_file_exists(srv, tmp_path, monkeypatch, existing, missing):
    """Hole 1: the answer to a request naming a model must not depend on which files exist."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (home / ".bashrc-probe").write_text("x")
    (tmp_path / "real.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    monkeypatch.chdir(tmp_path)

    def fill(s):
        return s.format(tmp=tmp_path, tmpname=tmp_path.name)
    for route, body in (("/v1/chat/completions", lambda m: {"model": m, "messages": [{"role": "user", "content": "x"}]}),
                        ("/api/generate", lambda m: {"model": m, "prompt": "x", "stream": False}),
                        ("/api/show", lambda m: {"model": m}),
                        ("/api/create", lambda m: {"model": "probe", "from": m}),
                        ("/api/create", lambda m: {"model": m, "from": "tiny"}),
                        ("/api/pull", lambda m: {"model": m, "stream": False})):
        answers = []
        for name in (fill(existing), fill(missing)):
            r = httpx.post(srv.url + route, json=body(name))
            text = r.text.replace(json.dumps(name)[1:-1], "NAME").replace(repr(name), "'NAME'")
            answers.append((r.status_code, text))
        assert answers[0] == answers[1], (route, answers)
        assert answers[0][0] in (400, 404)
