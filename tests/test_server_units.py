"""Server pieces that need no model: body parsing and checks, keep_alive, metrics text, JSON-mode recogniser,
the security middleware (on a bare ASGI app)."""
from __future__ import annotations

import math

import httpx
import pytest

from llamaforge.server.metrics import Metrics
from llamaforge.errors import LlamaforgeError
from llamaforge.generate.pipeline import plan
from llamaforge.generate.request import GenerationRequest
from llamaforge.server.common import api_error_from
from llamaforge.server.openai_routes import LIMITS
from llamaforge.server.schemas import (ApiError, OllamaGenerateRequest, OpenAIChatRequest, check_max_tokens,
                                       parse_body, parse_keep_alive)
from llamaforge.server.security import SecurityMiddleware, is_loopback_host, split_host

CHAT = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("raw, needle, param", [
    (b"", "empty", None),
    (b"{", "malformed JSON", None),
    (b"\xff\xfe{}", "not valid UTF-8", None),
    (b"[1, 2]", "must be a JSON object", None),
    (CHAT + b', "temperature": NaN}', "NaN is not a valid JSON value", None),
    (CHAT + b', "max_tokens": "12"}', "max_tokens", "max_tokens"),
    (CHAT + b', "max_tokens": 1.5}', "max_tokens", "max_tokens"),
    (CHAT + b', "n": true}', "'n'", "n"),
    (b'{"model": "m"}', "missing required field 'messages'", "messages"),
    (b'{"model": "m", "messages": "hi"}', "messages", "messages"),
    (b'{"model": 3, "messages": []}', "model", "model"),
    (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role", "messages[0].role"),
])
def test_parse_body_names_the_problem(raw, needle, param):
    with pytest.raises(ApiError) as e:
        parse_body(raw, OpenAIChatRequest)
    assert e.value.status == 400
    assert needle in e.value.message
    assert e.value.param == param


def test_parse_body_accepts_valid_and_refuses_unknown_fields():
    r = parse_body(CHAT + b', "temperature": 0, "stop": "x"}', OpenAIChatRequest)
    assert r.temperature == 0.0 and r.stop == "x" and r.messages[0].content == "hi"
    # A field nobody implements is refused by name, never dropped (issue 11: honest conformance).
    with pytest.raises(ApiError) as e:
        parse_body(CHAT + b', "temperature": 0, "frobnicate": 1, "stop": "x"}', OpenAIChatRequest)
    assert e.value.status == 400 and e.value.param == "frobnicate" and "frobnicate" in e.value.message
    g = parse_body(b'{"model": "m", "prompt": "p", "options": {"num_predict": 3}}', OllamaGenerateRequest)
    assert g.stream is True and g.options.num_predict == 3  # Ollama streams by default


def _seam(**options):
    from test_generate_support import tiny_lm
    try:
        plan(tiny_lm(), GenerationRequest(prompt=[1, 2, 3], options=options, limits=LIMITS))
    except LlamaforgeError as e:
        raise api_error_from(e) from None


@pytest.mark.parametrize("call, field, ok", [
    (lambda: check_max_tokens(0, "max_tokens"), "max_tokens", False),
    (lambda: check_max_tokens(-5, "max_tokens"), "max_tokens", False),
    (lambda: check_max_tokens(10 ** 9, "max_tokens"), "max_tokens", False),   # absurd
    (lambda: check_max_tokens(0, "max_tokens", allow_zero=True), "max_tokens", True),
    (lambda: check_max_tokens(100, "max_tokens"), "max_tokens", True),
    # Sampling ranges are checked once, by the request seam (with OpenAI's documented limits).
    (lambda: _seam(temperature=-0.1), "temperature", False),
    (lambda: _seam(temperature=math.nan), "temperature", False),
    (lambda: _seam(temperature=math.inf), "temperature", False),
    (lambda: _seam(temperature=2.5), "temperature", False),
    (lambda: _seam(temperature=0.0), "temperature", True),
    (lambda: _seam(top_p=0.0), "top_p", False),
    (lambda: _seam(top_p=1.01), "top_p", False),
    (lambda: _seam(top_p=-1.0), "top_p", False),
    (lambda: _seam(top_p=math.nan), "top_p", False),
    (lambda: _seam(top_p=1.0), "top_p", True),
    (lambda: _seam(top_p=1e-9), "top_p", True),
])
def test_range_checks(call, field, ok):
    if ok:
        call()
        return
    with pytest.raises(ApiError) as e:
        call()
    assert e.value.status == 400 and e.value.param == field and field in e.value.message


@pytest.mark.parametrize("value, seconds", [
    (None, None), (0, 0.0), (-1, -1.0), ("5m", 300.0), ("1h30m", 5400.0), ("10s", 10.0), ("250ms", 0.25),
    ("-1", -1.0), ("0", 0.0), (12.5, 12.5),
])
def test_keep_alive(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["5x", "m", "5", True, "1h-"])
def test_keep_alive_rejects(value):
    if value == "5":
        assert parse_keep_alive(value) == 5.0
        return
    with pytest.raises(ApiError) as e:
        parse_keep_alive(value)
    assert e.value.param == "keep_alive"


def test_metrics_text_format():
    m = Metrics(lambda: {"smollm2": {"active": 2, "queued": 1}})
    m.requests.inc(route="/v1/chat/completions", status="200")
    m.generated_tokens.inc(5, model="smollm2")
    m.latency.observe(0.2, route="/x")
    text = m.render()
    assert 'llamaforge_requests_total{route="/v1/chat/completions",status="200"} 1' in text
    assert 'llamaforge_generated_tokens_total{model="smollm2"} 5' in text
    assert 'llamaforge_active_requests{model="smollm2"} 2' in text
    assert 'llamaforge_queued_requests{model="smollm2"} 1' in text
    assert 'llamaforge_request_duration_seconds_bucket{route="/x",le="0.1"} 0' in text
    assert 'llamaforge_request_duration_seconds_bucket{route="/x",le="0.25"} 1' in text
    assert 'llamaforge_request_duration_seconds_count{route="/x"} 1' in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1].replace("+Inf", "inf"))


# ---------------------------------------------------------------------------------------------- middleware
async def _echo_app(scope, receive, send):
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok:%d" % len(body)})


def _client(**kw) -> httpx.AsyncClient:
    app = SecurityMiddleware(_echo_app, **kw)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:11435")


@pytest.mark.anyio
async def test_middleware_api_key_host_origin_size():
    async with _client(api_key="sekret", max_body=1000) as c:
        assert (await c.get("/health")).status_code == 200            # /health needs no key
        r = await c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await c.get("/api/tags", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "invalid API key" in r.json()["error"]  # Ollama error shape
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer sekret"})).status_code == 200
        assert (await c.get("/v1/models", headers={"X-API-Key": "sekret"})).status_code == 200
        ok = {"Authorization": "Bearer sekret"}
        r = await c.get("/v1/models", headers={**ok, "Host": "attacker.example:11435"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host"
        for host in ("localhost:11435", "127.0.0.1", "[::1]:11435", "app.localhost"):
            assert (await c.get("/v1/models", headers={**ok, "Host": host})).status_code == 200, host
        r = await c.get("/v1/models", headers={**ok, "Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
        assert (await c.get("/v1/models", headers={**ok, "Origin": "http://localhost:3000"})).status_code == 200
        r = await c.post("/v1/chat/completions", headers=ok, content=b"x" * 1001)
        assert r.status_code == 413
        assert (await c.post("/v1/chat/completions", headers=ok, content=b"x" * 1000)).text == "ok:1000"

        async def chunked():  # no Content-Length: the limit still holds while reading
            for _ in range(5):
                yield b"y" * 300
        r = await c.post("/v1/chat/completions", headers=ok, content=chunked())
        assert r.status_code == 413


@pytest.mark.anyio
async def test_middleware_public_bind_skips_host_check_but_not_origin():
    async with _client(loopback_only=False, allowed_origins=["https://ui.example"]) as c:
        assert (await c.get("/v1/models", headers={"Host": "myserver.lan"})).status_code == 200
        assert (await c.get("/v1/models", headers={"Origin": "https://ui.example"})).status_code == 200
        assert (await c.get("/v1/models", headers={"Origin": "http://localhost"})).status_code == 403
        same = {"Host": "myserver.lan:8080", "Origin": "http://myserver.lan:8080"}
        assert (await c.get("/v1/models", headers=same)).status_code == 200


def test_host_helpers():
    assert split_host("[::1]:8080") == ("::1", 8080)
    assert split_host("Example.COM") == ("example.com", None)
    assert is_loopback_host("127.0.0.2") and is_loopback_host("::1") and not is_loopback_host("10.0.0.1")


@pytest.fixture
def anyio_backend():
    return "asyncio"
