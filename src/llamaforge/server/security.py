"""The server's safe defaults, as one pure ASGI middleware (it must not buffer streamed responses).

In order, for every HTTP request:
1. Host / Origin checks against DNS rebinding (loopback binds): a browser tricked into sending requests to
   127.0.0.1 under a foreign name carries that name in Host, and a foreign page carries its Origin -> 403.
2. CORS for the origins allowed with `--allow-origin`: a browser's preflight (OPTIONS with
   Access-Control-Request-Method) is answered 204 with the Access-Control-Allow-* headers, before any API key
   is asked for (browsers never send credentials on a preflight); responses to allowed cross-origin requests
   carry Access-Control-Allow-Origin.
3. API key (when configured): every route but /health needs `Authorization: Bearer KEY` (what the OpenAI and
   Ollama clients send) or `X-API-Key: KEY` -> else 401. Keys are compared as UTF-8 bytes, so a non-ASCII key
   works.
4. Body size limit: Content-Length over the limit, or a chunked body that grows past it -> 413.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
CORS_METHODS = b"GET, POST, DELETE, OPTIONS"
CORS_HEADERS = b"authorization, content-type, x-api-key"
PUBLIC_PATHS = frozenset({"/health"})
DEFAULT_MAX_BODY = 8 * 1024 * 1024


def is_loopback_host(host: str) -> bool:
    """True for loopback names/addresses (the bind address decides whether Host checks apply)."""
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None]:
    """'example.com:80' -> ('example.com', 80); '[::1]:8080' -> ('::1', 8080). Port None when absent/bad."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[1:end] if end > 0 else value[1:], value[end + 1:] if end > 0 else ""
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port = value.split(":", 1)
    else:
        host, port = value, ""
    return host.lower(), int(port) if port.isdigit() else None


def error_body(path: str, status: int, message: str, type_: str, code: str | None = None) -> bytes:
    """Error JSON in the route's dialect: Ollama routes (/api/...) answer {"error": msg}, others OpenAI's shape."""
    if path.startswith("/api/"):
        body = {"error": message}
    else:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return json.dumps(body).encode()


class SecurityMiddleware:
    def __init__(self, app, *, api_key: str | None = None, loopback_only: bool = True,
                 allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
                 max_body: int = DEFAULT_MAX_BODY, on_reject=None):
        self.app = app
        self.api_key = api_key or None
        self.loopback_only = loopback_only
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}
        self.max_body = max_body
        self.on_reject = on_reject  # callback(path, status) for metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        problem = self._check_host(headers) or self._check_origin(headers)
        if problem:
            return await self._reject(scope, send, path, *problem)
        cors = self._cors_origin(headers)
        if cors is not None and scope.get("method") == "OPTIONS" and "access-control-request-method" in headers:
            return await self._preflight(send, cors)
        if cors is not None:
            send = _with_cors(send, cors)  # errors too: a page must be able to read why it was refused
        problem = self._check_key(path, headers) or self._check_length(headers)
        if problem:
            return await self._reject(scope, send, path, *problem)
        if scope.get("method") in ("POST", "PUT", "PATCH", "DELETE"):
            receive = _LimitedReceive(receive, self.max_body)
            sent = {"started": False}

            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    sent["started"] = True
                await send(message)
            try:
                return await self.app(scope, receive, send_wrapper)
            except _BodyTooLarge:
                if not sent["started"]:
                    return await self._reject(scope, send, path, 413, self._too_large_msg(), "invalid_request_error",
                                              "body_too_large")
                raise
        return await self.app(scope, receive, send)

    # -- checks: each returns None or (status, message, type, code)
    def _check_host(self, headers):
        if not self.loopback_only:
            return None
        host = headers.get("host")
        if host is None:
            return None  # HTTP/1.0 clients without Host cannot be DNS-rebound
        name, _ = split_host(host)
        if is_loopback_host(name) or name in self.allowed_hosts:
            return None
        return 403, f"Host {host!r} is not allowed on a loopback-bound server (DNS rebinding protection)", \
            "permission_error", "forbidden_host"

    def _check_origin(self, headers):
        origin = headers.get("origin")
        if origin is None:
            return None  # not a browser cross-origin request
        o = origin.rstrip("/").lower()
        if o in self.allowed_origins or "*" in self.allowed_origins:
            return None
        parts = urlsplit(o)
        oname = (parts.hostname or "").lower()
        if self.loopback_only and oname and is_loopback_host(oname):
            return None
        host = headers.get("host", "").lower()
        if parts.netloc and parts.netloc == host:
            return None  # same origin (the built-in web UI)
        return 403, f"Origin {origin!r} is not allowed (cross-origin requests are refused; see --allow-origin)", \
            "permission_error", "forbidden_origin"

    def _check_key(self, path, headers):
        if self.api_key is None or path in PUBLIC_PATHS:
            return None
        given = None
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif "x-api-key" in headers:
            given = headers["x-api-key"].strip()
        # ASGI hands header bytes over as latin-1 text: back to bytes, compared with the key's UTF-8 bytes.
        if given is not None and hmac.compare_digest(given.encode("latin-1", "replace"),
                                                     self.api_key.encode("utf-8")):
            return None
        why = "missing API key" if given is None else "invalid API key"
        return 401, f"{why}: send 'Authorization: Bearer <key>'", "authentication_error", "invalid_api_key"

    def _cors_origin(self, headers) -> bytes | None:
        """The Origin to echo in CORS headers: a cross-origin one that --allow-origin lets in (else None)."""
        origin = headers.get("origin")
        if origin is None or not self.allowed_origins:
            return None
        o = origin.rstrip("/").lower()
        if urlsplit(o).netloc == headers.get("host", "").lower():
            return None  # same origin: no CORS involved
        if o in self.allowed_origins or "*" in self.allowed_origins:
            return origin.encode("latin-1")
        return None

    async def _preflight(self, send, origin: bytes) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin), (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-allow-headers", CORS_HEADERS), (b"access-control-max-age", b"600"),
            (b"vary", b"Origin"), (b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    def _check_length(self, headers):
        cl = headers.get("content-length")
        if cl is None:
            return None
        if not cl.strip().isdigit():
            return 400, "invalid Content-Length header", "invalid_request_error", None
        if int(cl) > self.max_body:
            return 413, self._too_large_msg(), "invalid_request_error", "body_too_large"
        return None

    def _too_large_msg(self) -> str:
        return f"request body is larger than the limit of {self.max_body} bytes"

    async def _reject(self, scope, send, path, status, message, type_, code):
        if self.on_reject:
            self.on_reject(path, status)
        body = error_body(path, status, message, type_, code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="llamaforge"'))
        if status == 413:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _with_cors(send, origin: bytes):
    async def wrapped(message):
        if message["type"] == "http.response.start":
            message = dict(message, headers=list(message.get("headers", [])) + [
                (b"access-control-allow-origin", origin), (b"vary", b"Origin")])
        await send(message)
    return wrapped


class _BodyTooLarge(Exception):
    pass


class _LimitedReceive:
    """Counts body bytes as the app reads them; past the limit, the read raises (the app never sees more)."""

    def __init__(self, receive, limit: int):
        self._receive, self._limit, self._seen = receive, limit, 0

    async def __call__(self):
        message = await self._receive()
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            if self._seen > self._limit:
                raise _BodyTooLarge()
        return message
