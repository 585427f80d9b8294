"""Server shields with the official clients: an unsafe prompt answered with finish_reason content_filter
(OpenAI) / done_reason (Ollama) and the category named, the output guard while streaming, a code block withheld
by Code Shield, and the Prometheus counter. The model is a tiny random Llama whose answer a test-only seam stage
forces (so the wire behaviour is deterministic); the input guard is a tiny Llama Guard run by our engine."""
from __future__ import annotations

import httpx
import pytest

from llamaforge.generate import pipeline
from llamaforge.generate.request import Guards
from llamaforge.generate.stage import Stage
from llamaforge.safety.categories import LLAMA_GUARD_3 as CATS
from llamaforge.safety.classifier import Guard, Verdict
from llamaforge.safety.guard_format import LLAMA_GUARD_3
from llamaforge.server.app import ServerConfig, create_app
from safety_support import tiny_guard_lm
from test_generate_support import ByteTokenizer, tiny_lm
from test_safety_stages import TEMPLATE, Force
from test_server_e2e import Running

FORCE = "FORCE:"


class ForceStage(Stage):
    """Test-only: a user message "FORCE:<text>" makes the model write <text>."""

    name = "test_force"

    def applies(self, request):
        m = (request.messages or [{}])[-1]
        return isinstance(m.get("content"), str) and m["content"].startswith(FORCE)

    def processors(self, plan):
        return [Force(plan.request.messages[-1]["content"][len(FORCE):])]


class SplitGuard:
    """User turns: a tiny Llama Guard that flags everything (threshold 0); agent turns: flagged when they say
    BAD (so one server can show a released and a withheld stream)."""

    name = "test-guard"

    def __init__(self):
        self.user = Guard(tiny_guard_lm(), LLAMA_GUARD_3, CATS, threshold=0.0)

    def check(self, content, role="user"):
        if role == "user":
            return self.user.check(content, role=role)
        text = content[-1]["content"] if isinstance(content, list) else content
        bad = "BAD" in text
        return Verdict(not bad, ["S1"] if bad else [], 1.0 if bad else 0.0, {}, role, self.name)


@pytest.fixture(scope="module")
def parts():
    tok = ByteTokenizer()
    tok.chat_template = TEMPLATE
    stage = pipeline.register(ForceStage())
    yield tiny_lm(tokenizer=tok, context=2048), SplitGuard()
    pipeline.STAGES.remove(stage)


@pytest.fixture(scope="module")
def srv(parts):
    """Shields off by default; requests turn them on with the `guards` extension field."""
    lm, guard = parts
    r = Running(create_app(ServerConfig(max_batch=4, max_queue=8, ctx=2048, guards=Guards(model=guard)),
                           preloaded={"smollm2": lm}))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def srv_guarded(parts):
    """As `serve --guard-input --guard-output --code-shield` sets it up: every request is guarded."""
    lm, guard = parts
    cfg = ServerConfig(max_batch=4, max_queue=8, ctx=2048, guards=Guards(input=True, output=True, code=True,
                                                                          model=guard))
    r = Running(create_app(cfg, preloaded={"smollm2": lm}))
    yield r
    r.stop()


def _openai(srv):
    from openai import OpenAI
    return OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_unsafe_prompt_is_refused_with_content_filter(srv, srv_guarded):
    r = _openai(srv).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=20, extra_body={"guards": {"input": True}})
    c = r.choices[0]
    assert c.finish_reason == "content_filter"
    assert "flagged as unsafe" in c.message.content
    verdict = c.model_extra["guard"]["input"]
    assert verdict["safe"] is False and verdict["categories"][0] in c.message.content
    assert r.usage.completion_tokens == 0
    import ollama
    o = ollama.Client(host=srv_guarded.url, timeout=120).chat(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                                       options={"num_predict": 20})
    assert o.done_reason == "content_filter" and "flagged as unsafe" in o.message.content


def test_output_guard_streams_checked_text_and_cuts_an_unsafe_answer(srv):
    client = _openai(srv)
    safe = "All calm here. " * 40
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": FORCE + safe}], max_tokens=1000, stream=True,
        extra_body={"guards": {"output": True}, "temperature": 0}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == safe
    assert chunks[-1].choices[0].finish_reason == "stop"
    bad = "Fine start. " * 30 + "BAD " * 40
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": FORCE + bad}], max_tokens=1000, stream=True,
        extra_body={"guards": {"output": True}, "temperature": 0}))
    shown = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "BAD" not in shown and "withheld" in shown and shown.startswith("Fine start.")
    last = chunks[-1].choices[0]
    assert last.finish_reason == "content_filter"
    assert last.model_extra["guard"]["output"]["safe"] is False


def test_code_block_is_blocked_and_counted(srv):
    answer = "Sure:\n```python\nimport pickle\nobj = pickle.loads(request.data)\n```\nDone."
    chunks = list(_openai(srv).chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": FORCE + answer}], max_tokens=400, stream=True,
        extra_body={"guards": {"code": True}, "temperature": 0}))
    shown = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "pickle.loads" not in shown and "Code Shield withheld" in shown and "CWE-502" in shown
    last = chunks[-1].choices[0]
    assert last.finish_reason == "content_filter"
    assert last.model_extra["guard"]["code"]["verdict"] == "block"
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'llamaforge_guard_decisions_total{check="code",result="block",category="CWE-502"}' in metrics
    assert 'check="input",result="unsafe"' in metrics
