"""The web chat page in a real browser (Debian's chromium driven by Playwright) against a real llamaforge server
on SmolLM2: streaming, a second turn, stop, regenerate, edit-and-resend, reload and reopen, per-key isolation,
hostile markup in user text and in answers, dropped connections, server errors, citations and guard verdicts,
JSON mode, long answers and conversations, the phone layout. Screenshots go to bench/out/webui/.

Marked `browser` (run by `make test-browser`, which installs chromium): `make test` cannot install system
packages. Without chromium or Playwright these tests fail with a message saying how to get them.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest
import torch
from webui_support import (ANSWER_MS, DANGEROUS_DOM, DROP_MARKER, DropConnections, Running, conversation_id,
                           enter_key, mark_answers, new_page, require_browser, script_chat, send, set_params,
                           shot, sse, wait_answers, wait_new_answer)

from llamaforge.server.app import ServerConfig, create_app
from llamaforge.server.conversations import ConversationStore

pytestmark = pytest.mark.browser
CTX = 256
API = "/ui/api/conversations"


@pytest.fixture(scope="module")
def browser():
    sync_playwright = require_browser()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=__import__("webui_support").CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    import llamaforge
    torch.set_num_threads(2)
    # Dense float32 weights: a request's greedy text is the same alone or batched, so the page's answers can be
    # compared with the Python API's.
    return llamaforge.load(str(smollm2_gguf), quant="none")


def _serve(lm, path, **config):
    app = create_app(ServerConfig(ctx=CTX, max_batch=4, **config), preloaded={"smollm2": lm})
    app.state.ui_conversations = ConversationStore(path)
    return Running(DropConnections(app))


@pytest.fixture(scope="module")
def srv(lm, tmp_path_factory):
    r = _serve(lm, tmp_path_factory.mktemp("webui") / "conversations.sqlite3")
    yield r
    r.stop()


@pytest.fixture(scope="module")
def keyed(lm, tmp_path_factory):
    r = _serve(lm, tmp_path_factory.mktemp("webui-keys") / "conversations.sqlite3", api_key=["key-a", "key-b"])
    yield r
    r.stop()


@pytest.fixture
def page(browser, srv):
    p = new_page(browser, srv.url)
    yield p
    assert not p.errors, p.errors
    p.context.close()


@pytest.fixture
def bare_page(browser, srv):
    """The page with its Content-Security-Policy switched off: only the sanitizer stands between markup and
    execution. (With the policy on, Chromium also reports DOMPurify's own inert parse of the markup as
    violations, so the policy cannot be the judge here.)"""
    p = new_page(browser, srv.url, bypass_csp=True)
    yield p
    assert not p.errors, p.errors
    p.context.close()


def stored(srv, cid, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{srv.url}{API}/{cid}", headers=headers, timeout=30).json()


def reference(lm, messages, max_tokens):
    from llamaforge.generate.api import chat
    return chat(lm, messages, max_tokens=max_tokens, temperature=0).text


# ------------------------------------------------------------------------------------------ conversations
def test_stream_two_turns_like_the_api_then_reload_and_reopen(page, srv, lm):
    set_params(page, max_tokens=10, temperature=0)
    page.evaluate("""() => { window.__mutations = 0;
        new MutationObserver((l) => { window.__mutations += l.length; })
          .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
    send(page, "What is the capital of France?")
    wait_answers(page, 1)
    assert page.evaluate("window.__stopShown")                                # Stop replaced Send while streaming
    assert page.evaluate("window.__mutations") > 3                            # the answer arrived in pieces
    cid = conversation_id(page)
    send(page, "And of Germany?")
    wait_answers(page, 2)
    shot(page, "chat-desktop-light")

    conv = stored(srv, cid)
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    first = [{"role": "user", "content": "What is the capital of France?"}]
    assert conv["messages"][1]["content"] == reference(lm, first, 10)       # the page asked what the API is asked
    second = first + [{"role": "assistant", "content": conv["messages"][1]["content"]},
                      {"role": "user", "content": "And of Germany?"}]
    assert conv["messages"][3]["content"] == reference(lm, second, 10)      # ...with the whole history
    stats = page.locator("article[data-role=assistant] .msg-stats").first.inner_text()
    assert "tokens" in stats and "tok/s" in stats and "first token" in stats
    assert conv["messages"][1]["meta"]["usage"]["completion_tokens"] > 0

    # Reload: the list comes from the server; the conversation reopens from its link.
    page.goto(srv.url + "/ui")
    page.wait_for_selector("body[data-ready=true]")
    nav = page.get_by_role("navigation", name="Conversations")
    link = nav.get_by_role("link", name=conv["title"])
    link.click()
    page.wait_for_function(f"() => location.hash === '#/c/{cid}'")
    msgs = page.locator("article[data-role]")
    from playwright.sync_api import expect
    expect(msgs).to_have_count(4)
    assert [msgs.nth(i).get_attribute("data-role") for i in range(4)] == roles
    assert msgs.nth(0).locator(".msg-body").inner_text() == "What is the capital of France?"
    assert page.get_by_role("heading", name=conv["title"]).is_visible()
    page.get_by_role("button", name="Settings").click()                     # the chat's settings came back too
    assert page.get_by_label("Max tokens").input_value() == "10"
    assert page.get_by_label("Temperature").input_value() == "0"
    assert page.get_by_label("Model", exact=True).input_value() == "smollm2"


def test_stop_keeps_the_partial_answer_then_regenerate_and_edit(page, srv):
    from playwright.sync_api import expect
    set_params(page, max_tokens=200, temperature=0)
    send(page, "Tell me a long story about a dragon who learns to bake bread.")
    body = page.locator("article[data-role=assistant] .msg-body")
    page.wait_for_function("() => document.querySelector('article[data-role=assistant] .msg-body')?.textContent.length > 3",
                           timeout=ANSWER_MS)
    page.get_by_role("button", name="Stop").click()
    wait_answers(page, 1)
    expect(page.get_by_text("Stopped.")).to_be_visible()
    cid = conversation_id(page)
    saved = stored(srv, cid)["messages"][1]
    assert saved["meta"]["stopped"] is True and saved["content"].strip()
    assert saved["meta"]["usage"] is None or saved["meta"]["usage"]["completion_tokens"] < 200
    assert body.inner_text().strip()[:3] in saved["content"]
    # The server saw the client go: the request was cancelled, not run to its 200 tokens.
    deadline = time.time() + 30
    while time.time() < deadline:
        recent = httpx.get(srv.url + "/debug/scheduler", timeout=30).json()["models"]["smollm2"]["recent"]
        if recent and recent[-1]["outcome"] == "cancelled":
            break
        time.sleep(0.2)
    assert recent[-1]["outcome"] == "cancelled", recent

    # Regenerate: the stopped answer is replaced by a new one (one answer, a new stored row).
    set_params(page, max_tokens=6)
    deadline = time.time() + 30                                              # settings are saved with the chat
    while stored(srv, cid)["settings"].get("max_tokens") != 6 and time.time() < deadline:
        time.sleep(0.2)
    assert stored(srv, cid)["settings"]["max_tokens"] == 6
    mark_answers(page)
    page.get_by_role("button", name="Regenerate").click()
    wait_new_answer(page)
    after = stored(srv, cid)["messages"]
    assert len(after) == 2 and after[1]["id"] != saved["id"] and not after[1]["meta"].get("stopped")
    expect(page.get_by_text("Stopped.")).to_have_count(0)

    # Edit-and-resend the question: the old answer goes, a new one comes for the new text.
    page.get_by_role("button", name="Edit message").click()
    page.get_by_role("textbox", name="Edit message").fill("Name one colour.")
    mark_answers(page)
    page.get_by_role("button", name="Save and send").click()
    wait_new_answer(page)
    final = stored(srv, cid)["messages"]
    assert [m["content"] for m in final][:1] == ["Name one colour."] and len(final) == 2
    assert page.locator("article[data-role=user] .msg-body").inner_text() == "Name one colour."


def test_each_key_has_its_own_conversations(browser, keyed):
    a = new_page(browser, keyed.url, key="key-a")
    set_params(a, max_tokens=2, temperature=0)
    send(a, "Remember the word pineapple.")
    wait_answers(a, 1)
    cid = conversation_id(a)
    a.reload()
    a.wait_for_selector("body[data-ready=true]")                              # the key is kept for the tab
    assert a.get_by_role("dialog", name="API key").is_hidden()
    assert a.get_by_role("navigation", name="Conversations").get_by_role("link").count() == 1

    b = new_page(browser, keyed.url, key="wrong-key", ready=False)           # a wrong key is asked again
    dialog = b.get_by_role("dialog", name="API key")
    dialog.get_by_text("invalid API key").wait_for(timeout=30_000)
    enter_key(b, "key-b")
    b.wait_for_selector("body[data-ready=true]", timeout=60_000)
    assert b.get_by_role("navigation", name="Conversations").get_by_role("link").count() == 0
    b.goto(f"{keyed.url}/ui#/c/{cid}")                                        # knowing the id is not enough
    b.get_by_role("alert").get_by_text("does not exist").wait_for(timeout=30_000)
    assert "pineapple" not in b.locator("#messages").inner_text()
    assert stored(keyed, cid, "key-b")["error"]["code"] == "conversation_not_found"
    assert stored(keyed, cid, "key-a")["messages"][0]["content"] == "Remember the word pineapple."
    shot(b, "other-key-empty")
    for p in (a, b):
        assert not p.errors, p.errors
        p.context.close()


def test_search_rename_and_delete_from_the_page(page, srv):
    script_chat(page, sse("Bananas are berries."))
    send(page, "Tell me a fruit fact about bananas")
    wait_answers(page, 1)
    cid = conversation_id(page)
    page.unroute("**/v1/chat/completions")
    script_chat(page, sse("The sea is salty."))
    page.get_by_role("button", name="New chat").click()
    send(page, "Something about the sea")
    wait_answers(page, 1)
    nav = page.get_by_role("navigation", name="Conversations")
    search = page.get_by_role("searchbox", name="Search conversations")
    search.fill("BERRIES")                                                   # found in an answer's text
    from playwright.sync_api import expect
    expect(nav.get_by_role("link")).to_have_count(1)
    assert nav.get_by_role("link").inner_text() == "Tell me a fruit fact about bananas"
    assert "berries" in nav.locator(".match").inner_text().lower()
    search.fill("no such text anywhere")
    expect(nav.get_by_role("link")).to_have_count(0)
    assert page.get_by_text("No conversation matches.").is_visible()
    search.fill("")                                                          # (other tests' chats are here too)
    expect(nav.get_by_role("link", name="Something about the sea")).to_have_count(1)
    expect(nav.get_by_role("link", name="Tell me a fruit fact about bananas")).to_have_count(1)

    nav.get_by_role("link", name="Tell me a fruit fact about bananas").click()
    page.wait_for_function(f"() => location.hash === '#/c/{cid}'")
    page.get_by_role("button", name="Rename").click()
    page.get_by_role("textbox", name="Conversation title").fill("Banana facts")
    page.get_by_role("button", name="Save title").click()
    expect(nav.get_by_role("link", name="Banana facts")).to_have_count(1)
    assert page.get_by_role("heading", name="Banana facts").is_visible()
    assert stored(srv, cid)["title"] == "Banana facts"

    page.get_by_role("button", name="Delete").click()
    page.get_by_role("button", name="Confirm delete").click()               # two clicks: no accidental loss
    expect(nav.get_by_role("link", name="Banana facts")).to_have_count(0)
    assert stored(srv, cid)["error"]["code"] == "conversation_not_found"
    assert page.locator("article[data-role]").count() == 0
    assert page.get_by_role("heading", name="New chat").is_visible()


# ------------------------------------------------------------------------------------------- bad input
XSS = [
    "**bold markdown** and <b>html bold</b>",
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    '<svg onload="window.__pwned=3"><circle r="5"/></svg>',
    '<iframe srcdoc="<script>parent.__pwned=4</script>"></iframe>',
    "[click me](javascript:window.__pwned=5)",
    '<a href="javascript:window.__pwned=6">a link</a>',
    '<details open ontoggle="window.__pwned=7">toggle</details>',
    "<style>body{display:none}</style>",
    "`</code><script>window.__pwned=8</script>`",
    '```html\n</code></pre><img src=x onerror="window.__pwned=9">\n```',
    '<form action="javascript:window.__pwned=10"><button>go</button></form>',
    '<div style="background:url(javascript:window.__pwned=12)">styled</div>',
    '<input autofocus onfocus="window.__pwned=13">',
    '![pic](x" onerror="window.__pwned=14)',
    # Last: an unclosed <style> makes the rest of the text one raw HTML block (CommonMark), all of it removed.
    '<math><mtext><table><mglyph><style><img src=x onerror="window.__pwned=11">',
]


def _assert_inert(page):
    page.wait_for_timeout(300)   # give any injected handler (onerror, onload, autofocus) its chance
    found = page.evaluate(DANGEROUS_DOM)
    assert found == {"bad": [], "pwned": None}, found
    assert page.locator("#messages").is_visible()


def test_user_text_is_shown_as_text(bare_page, srv):
    page = bare_page
    script_chat(page, sse("ok"))
    text = "\n".join(XSS)
    send(page, text)
    wait_answers(page, 1)
    assert page.locator("article[data-role=user] .msg-body").inner_text() == text
    _assert_inert(page)
    cid = conversation_id(page)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.locator("article[data-role=user]").wait_for()
    assert page.locator("article[data-role=user] .msg-body").inner_text() == text
    _assert_inert(page)
    assert stored(srv, cid)["messages"][0]["content"] == text


def test_hostile_markup_in_answers_never_runs(bare_page, srv):
    page = bare_page
    answer = "\n\n".join(XSS)
    script_chat(page, sse(answer, piece=5))                                  # tags split across deltas
    send(page, "say something dangerous")
    wait_answers(page, 1)
    _assert_inert(page)
    body = page.locator("article[data-role=assistant] .msg-body")
    assert body.locator("strong").first.inner_text() == "bold markdown"     # markdown still renders
    assert body.locator("b").inner_text() == "html bold"                    # and harmless HTML too
    assert body.locator("a", has_text="a link").count() == 1                # the link stays, its script goes
    shot(page, "xss-answer")
    cid = conversation_id(page)
    # The same answer stored and re-rendered from the server.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.locator("article[data-role=assistant]").wait_for()
    _assert_inert(page)
    assert stored(srv, cid)["messages"][1]["content"] == answer


def test_a_dropped_connection_keeps_the_partial_answer(page, srv):
    set_params(page, max_tokens=40, temperature=0, system=f"You are helpful. {DROP_MARKER}")
    send(page, "Count from one to twenty in words.")
    alert = page.locator("article[data-role=assistant] .msg-error")
    alert.wait_for(timeout=ANSWER_MS)
    assert "onnection" in alert.inner_text()
    partial = page.locator("article[data-role=assistant] .msg-body").inner_text()
    assert partial.strip()
    saved = stored(srv, conversation_id(page))["messages"][1]
    assert saved["content"].strip() and saved["meta"]["error"]
    assert page.get_by_role("button", name="Send").is_visible()             # the page is usable again
    shot(page, "dropped-connection")


def test_a_server_error_shows_its_message(page, srv):
    send(page, "word " * 400)                                                # longer than the 256-token window
    banner = page.locator("#error")
    banner.wait_for(timeout=ANSWER_MS)
    text = banner.inner_text()
    assert "256" in text and "context" in text
    assert page.locator("article[data-role=assistant]").count() == 0
    assert page.locator("article[data-role=user]").count() == 1              # the question is kept
    banner.get_by_role("button", name="Retry").wait_for()


# ------------------------------------------------------------------------------- features of the answer
def test_citations_and_guard_verdicts(page, srv):
    cites = [{"n": 1, "source": "handbook.md", "heading": "Install", "text": "Install with pip install foo.",
              "chunk_id": "c1"},
             {"n": 2, "source": "faq.md", "heading": None, "text": "Foo needs Python 3.10.", "chunk_id": "c7"}]
    # The safety stages' shape: Result.extra["guard"] = {"input", "output", "code", "injection"}.
    guard = {"input": {"safe": True, "categories": [], "score": 0.01},
             "output": {"safe": False, "categories": ["S2"], "score": 0.93},
             "code": {"verdict": "warn", "findings": [{"cwe": "CWE-78", "line": 2, "rule": "py-shell",
                                                       "severity": "warning", "message": "shell=True"}]}}
    seen = []
    script_chat(page, sse("Install it with pip [1]; it needs Python 3.10 [2]. See [3].",
                          extras={"citations": cites, "guard": guard}, finish="content_filter"), seen)
    send(page, "How do I install foo?")
    wait_answers(page, 1)
    art = page.locator("article[data-role=assistant]")
    assert "retrieval" not in seen[0]                       # no RAG routes on this server: the field is not sent
    ref = art.get_by_role("link", name="source 1")
    assert art.get_by_role("link", name="source 3").count() == 0        # [3] has no source: left as text
    assert art.get_by_text("Install with pip install foo.").is_hidden()
    ref.click()
    assert art.get_by_text("Install with pip install foo.").is_visible()
    assert art.get_by_role("button", name="[2] faq.md").get_attribute("aria-expanded") == "false"
    summary = art.locator(".msg-guard summary").inner_text()
    assert "input: safe" in summary and "output: unsafe (S2)" in summary and "code: warn (1 finding)" in summary
    assert art.get_by_text("Blocked by a safety guard.").is_visible()
    shot(page, "citations-guard")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.locator("article[data-role=assistant]").wait_for()
    assert page.locator("article[data-role=assistant]").get_by_role("link", name="source 2").count() == 1


def test_documents_panel_appears_when_the_server_has_rag(browser, srv, tmp_path):
    ctx = browser.new_context()
    page = ctx.new_page()
    uploads, created, chats = [], [], []

    def collections(route):
        if route.request.method == "POST":
            created.append(json.loads(route.request.post_data))
            return route.fulfill(status=201, json={"name": "handbook"})
        route.fulfill(json={"object": "list", "data": [{"name": "handbook", "documents": 2, "chunks": 9}]})

    def documents(route):
        uploads.append((route.request.url, route.request.post_data_buffer))
        route.fulfill(json={"added": ["notes.md"], "updated": [], "unchanged": [], "chunks": 3, "errors": []})
    page.route("**/v1/rag/collections", collections)
    page.route(re.compile(r".*/v1/rag/collections/[^/]+/documents\?.*"), documents)
    script_chat(page, sse("From the handbook [1].", extras={"citations": [
        {"n": 1, "source": "notes.md", "text": "the note", "chunk_id": "x"}]}), chats)
    page.goto(srv.url + "/ui")
    page.wait_for_selector("body[data-ready=true]")
    page.get_by_role("button", name="Settings").click()
    panel = page.get_by_role("group", name="Documents (RAG)")
    assert panel.is_visible()
    page.get_by_label("Collection", exact=True).select_option("handbook")
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\nThe launch is on Tuesday.\n")
    page.get_by_label("Choose documents").set_input_files(str(notes))
    page.get_by_role("button", name="Upload").click()
    page.get_by_text("1 of 1 file(s) in handbook, 3 new chunks.").wait_for(timeout=30_000)
    assert created == [{"name": "handbook"}]
    assert uploads[0][0].endswith("/v1/rag/collections/handbook/documents?filename=notes.md")
    assert uploads[0][1] == notes.read_bytes()
    send(page, "When is the launch?")
    wait_answers(page, 1)
    assert chats[0]["retrieval"] == {"collection": "handbook", "k": 4}
    ctx.close()


def test_json_mode_asks_for_json_and_shows_it_as_code(page, srv):
    seen = []
    page.on("request", lambda r: seen.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions")
            else None)
    set_params(page, max_tokens=8, temperature=0, json_mode=True)
    send(page, "Give the capital of France as JSON.")
    wait_answers(page, 1)
    assert seen[0]["response_format"] == {"type": "json_object"}
    assert seen[0]["stream_options"] == {"include_usage": True} and seen[0]["max_tokens"] == 8
    code = page.locator("article[data-role=assistant] code.language-json")
    assert code.count() == 1 and code.inner_text().lstrip().startswith("{")


def test_long_answers_and_long_conversations_render_completely(page, srv):
    blocks = [f"## Part {i}\n\nParagraph {i} with *emphasis* and `code {i}`.\n\n```python\nx_{i} = {i}\n```\n"
              for i in range(300)]
    answer = "\n".join(blocks)                                               # ~25k characters, 300 code blocks
    script_chat(page, sse(answer, piece=3))
    send(page, "a very long answer please")
    wait_answers(page, 1)
    body = page.locator("article[data-role=assistant] .msg-body")
    assert body.locator("pre").count() == 300 and body.locator("button", has_text="Copy").count() == 300
    assert body.locator("h2").last.inner_text() == "Part 299"
    assert body.locator("code.language-python").nth(299).inner_text().strip() == "x_299 = 299"
    # Rendered block by block while streaming, yet the same page as the whole text rendered at once (a reload
    # renders the stored answer in one go).
    streamed = body.inner_html()
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.locator("article[data-role=assistant] pre").nth(299).wait_for()
    once = page.locator("article[data-role=assistant] .msg-body").inner_html()
    strip = lambda html: re.sub(r"</?div>", "", html)  # noqa: E731 - the streamed body groups blocks in two divs
    assert strip(streamed) == strip(once)

    # 1,200 stored messages: the newest are shown at once, older ones are added behind them.
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i}"} for i in range(1200)]
    cid = httpx.post(srv.url + API, json={"title": "long one", "messages": msgs[:100]}, timeout=30).json()["id"]
    for i in range(100, 1200, 100):
        httpx.post(f"{srv.url}{API}/{cid}/messages", json={"messages": msgs[i:i + 100]}, timeout=30)
    page.goto(f"{srv.url}/ui#/c/{cid}")
    page.get_by_text("message number 1199").wait_for(timeout=30_000)
    from playwright.sync_api import expect
    expect(page.locator("article[data-role]")).to_have_count(1200, timeout=60_000)
    assert page.locator("article[data-role] .msg-body").first.text_content() == "message number 0"
    at_bottom = page.evaluate("(() => { const m = document.getElementById('messages');"
                              " return m.scrollHeight - m.scrollTop - m.clientHeight < 200; })()")
    assert at_bottom


def test_phone_layout_dark_theme_and_keyboard(browser, srv):
    page = new_page(browser, srv.url, width=390, height=844, color_scheme="dark")
    script_chat(page, sse("Line one.\n\n```js\nconsole.log('hi')\n```"))
    nav = page.get_by_role("navigation", name="Conversations")
    from playwright.sync_api import expect
    expect(nav).not_to_be_in_viewport()
    box = page.get_by_role("textbox", name="Message")
    box.fill("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"                    # Shift+Enter: a new line, not sent
    assert page.locator("article[data-role]").count() == 0
    box.press("Enter")
    wait_answers(page, 1)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390                                                      # nothing wider than the phone
    bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(21, 23, 26)"                                           # the dark theme followed the system
    shot(page, "chat-phone-dark")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.get_by_role("button", name="Copy js code").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == "console.log('hi')\n"
    page.get_by_role("button", name="Show conversations").click()
    expect(nav).to_be_in_viewport()
    assert nav.get_by_role("link").count() >= 1
    shot(page, "phone-conversations")
    page.get_by_role("button", name="Theme: automatic").click()              # auto -> light
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    assert not page.errors, page.errors
    page.context.close()
