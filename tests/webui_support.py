"""Helpers for the web UI browser tests: a real llamaforge server in a thread, Debian's chromium through
Playwright, page helpers that speak the page's accessible contract, and scripted event streams for the cases a
real model cannot be made to produce on demand (hostile markup, citations, guard verdicts)."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from llamaforge.server.app import make_server

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("LLAMAFORGE_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("LLAMAFORGE_WEBUI_SHOTS", ROOT / "bench" / "out" / "webui"))
ANSWER_MS = 600_000          # one answer on a loaded 2-core machine can take minutes
DROP_MARKER = "[drop-connection-test]"


def find_browser():
    """(Playwright's sync_playwright, the chromium path), or RuntimeError saying how to get what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise RuntimeError("the browser tests need Playwright for Python: `.venv/bin/pip install -e '.[browser]'` "
                           "(pins playwright==1.65.2), or run `make test-browser`") from None
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"the browser tests drive Debian's chromium at {CHROMIUM}, which is missing: "
                           "`apt-get install -y chromium` (what `make test-browser` does), or set "
                           "LLAMAFORGE_CHROMIUM")
    return sync_playwright, CHROMIUM


def require_browser():
    """Playwright's sync API, or a test failure (not a skip) that says how to get the browser pieces."""
    try:
        return find_browser()[0]
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


require_browser_for_bench = find_browser


class DropConnections:
    """ASGI wrapper: a chat request whose body contains DROP_MARKER loses its connection after a few streamed
    events (the app raises mid-response, so uvicorn closes the socket without ending the chunked body)."""

    def __init__(self, app, after_events: int = 3):
        self.app, self.after = app, after_events

    @property
    def state(self):
        return self.app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        body = bytearray()
        messages = []
        while True:
            m = await receive()
            messages.append(m)
            body += m.get("body", b"")
            if m["type"] != "http.request" or not m.get("more_body"):
                break
        replay = iter(messages)

        async def receive_replay():   # the app reads the body we already took
            return next(replay, None) or await receive()
        if DROP_MARKER.encode() not in body:
            return await self.app(scope, receive_replay, send)
        seen = {"events": 0}

        async def send_then_drop(message):
            if message["type"] == "http.response.body" and b'"content":"' in message.get("body", b"") \
                    and b'"content":""' not in message.get("body", b""):
                seen["events"] += 1
                if seen["events"] > self.after:
                    raise RuntimeError("test: connection dropped on purpose")
            await send(message)
        return await self.app(scope, receive_replay, send_then_drop)


class Running:
    """A uvicorn server in a daemon thread on a free loopback port."""

    def __init__(self, app):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.app = app
        self.server = make_server(app, "127.0.0.1", self.port, log_level="critical", graceful_timeout=5)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


# ------------------------------------------------------------------------------------------------ the page
INIT_SCRIPT = """
window.__cspViolations = [];
// Whether Stop was ever shown in place of Send (a fast answer may come and go between two test polls).
window.__stopShown = false;
document.addEventListener('DOMContentLoaded', () => {
  const stop = document.getElementById('stop'), sendButton = document.getElementById('send');
  if (!stop) return;
  new MutationObserver(() => { if (!stop.hidden && sendButton.hidden) window.__stopShown = true; })
    .observe(stop, {attributes: true});
});
document.addEventListener('securitypolicyviolation',
  (e) => window.__cspViolations.push(e.violatedDirective + ' ' + (e.blockedURI || e.sample || '')));
"""


def new_page(browser, url, *, width=1280, height=860, key=None, color_scheme="light", ready=True,
             bypass_csp=False):
    """A fresh browser context (its own sessionStorage) on /ui, ready for input. With `key`, answer the key
    dialog; with ready=False, do not wait for the page to finish starting. bypass_csp=True switches the page's
    Content-Security-Policy off, so a test sees what the sanitizer alone lets through."""
    ctx = browser.new_context(viewport={"width": width, "height": height}, color_scheme=color_scheme,
                              bypass_csp=bypass_csp)
    ctx.add_init_script(INIT_SCRIPT)
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url + "/ui")
    if key is not None:
        enter_key(page, key)
    if ready:
        page.wait_for_selector("body[data-ready=true]", timeout=60_000)
    return page


def enter_key(page, key):
    dialog = page.get_by_role("dialog", name="API key")
    dialog.wait_for(timeout=30_000)
    dialog.get_by_label("API key").fill(key)
    dialog.get_by_role("button", name="Continue").click()


def set_params(page, **values):
    """Fill the settings panel (max_tokens=8, temperature=0, system="...", json_mode=True, seed=1)."""
    toggle = page.get_by_role("button", name="Settings")
    if page.locator("#settings").is_hidden():
        toggle.click()
    labels = {"max_tokens": "Max tokens", "temperature": "Temperature", "top_p": "Top-p", "seed": "Seed",
              "system": "System prompt"}
    for name, value in values.items():
        if name == "json_mode":
            page.get_by_label("JSON mode").set_checked(bool(value))
        else:
            page.get_by_label(labels[name]).fill(str(value))
    toggle.click()


def send(page, text):
    box = page.get_by_role("textbox", name="Message")
    box.fill(text)
    box.press("Enter")


# Predicates are arrow functions: Playwright re-evaluates a plain string with eval(), which the page's
# Content-Security-Policy forbids.
def wait_answers(page, n, timeout=ANSWER_MS):
    """Wait until `n` finished answers are on the page and nothing streams."""
    from playwright.sync_api import expect
    expect(page.locator("article[data-role=assistant]:not([aria-busy=true])")).to_have_count(n, timeout=timeout)
    page.wait_for_function("() => document.body.dataset.streaming !== 'true'", timeout=timeout)


def mark_answers(page):
    """Tag the answers on the page now, so wait_new_answer can tell a replacement from the old one."""
    page.evaluate("() => document.querySelectorAll('article[data-role=assistant]')"
                  ".forEach((a) => { a.dataset.old = '1'; })")


def wait_new_answer(page, timeout=ANSWER_MS):
    from playwright.sync_api import expect
    expect(page.locator("article[data-role=assistant]:not([data-old]):not([aria-busy=true])")).to_have_count(
        1, timeout=timeout)
    page.wait_for_function("() => document.body.dataset.streaming !== 'true'", timeout=timeout)


def shot(page, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def conversation_id(page) -> str:
    page.wait_for_function("() => /^#\\/c\\/[0-9a-f]{32}$/.test(location.hash)", timeout=60_000)
    return page.evaluate("location.hash").split("/")[-1]


# -------------------------------------------------------------------------------------- scripted streams
def sse(text: str, *, piece: int = 7, finish="stop", extras: dict | None = None, usage=True) -> str:
    """An OpenAI-shaped chat completion stream that says `text` in `piece`-character deltas."""
    base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "smollm2"}
    out = [dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    for i in range(0, len(text), piece):
        out.append(dict(base, choices=[{"index": 0, "delta": {"content": text[i:i + piece]}, "finish_reason": None}]))
    out.append(dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish, **(extras or {})}]))
    if usage:
        out.append(dict(base, choices=[], usage={"prompt_tokens": 10, "completion_tokens": max(1, len(text) // 4),
                                                 "total_tokens": 10 + max(1, len(text) // 4)}))
    return "".join(f"data: {json.dumps(o)}\n\n" for o in out) + "data: [DONE]\n\n"


def script_chat(page, body: str, seen: list | None = None):
    """Answer the page's chat requests with `body` (an SSE text); request bodies are appended to `seen`."""
    def handle(route):
        if seen is not None:
            seen.append(json.loads(route.request.post_data or "{}"))
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
    page.route("**/v1/chat/completions", handle)


DANGEROUS_DOM = """() => {
  const root = document.getElementById('messages');
  const bad = [];
  for (const el of root.querySelectorAll('*')) {
    if (['SCRIPT','IFRAME','OBJECT','EMBED','SVG','MATH','STYLE','FORM','INPUT','IMG','LINK','META','BASE']
        .includes(el.tagName.toUpperCase())) bad.push('tag ' + el.tagName);
    for (const a of el.attributes) {
      if (/^on/i.test(a.name)) bad.push(el.tagName + ' ' + a.name);
      if (a.name === 'style') bad.push(el.tagName + ' style');
      if (/^\\s*(javascript|data|vbscript):/i.test(a.value) && ['href','src','action','formaction','xlink:href']
          .includes(a.name)) bad.push(el.tagName + ' ' + a.name + '=' + a.value);
    }
  }
  return {bad, pwned: window.__pwned ?? null};
}"""
