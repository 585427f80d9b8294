"""Honest conformance: every request field the official `openai` and `ollama` clients can send is either
implemented (the request succeeds and the field has its effect) or refused with a 400 that names it. The field
lists are read from the clients' own request types, so a field a new client version adds fails this test until
it is handled here and in the dialect module.
"""
from __future__ import annotations

import json

import httpx
import pytest

from llamaforge.server.app import ServerConfig, create_app
from test_server_e2e import Running

MSG = [{"role": "user", "content": "Say hi."}]
OK, REFUSED = "ok", "refused"


@pytest.fixture(scope="module")
def http(smollm2_gguf):
    import llamaforge
    lm = llamaforge.load(str(smollm2_gguf), compile=False)
    r = Running(create_app(ServerConfig(max_batch=4, ctx=256), preloaded={"smollm2": lm}))
    with httpx.Client(base_url=r.url, timeout=120) as c:
        c.lm = lm
        yield c
    r.stop()


def _fields(typed_dict) -> set[str]:
    return set(typed_dict.__annotations__)


def _openai_types():
    from openai.types import completion_create_params as comp, embedding_create_params as emb
    from openai.types.chat import completion_create_params as chat
    return chat.CompletionCreateParamsBase, comp.CompletionCreateParamsBase, emb.EmbeddingCreateParams


def _text(r) -> str:
    return r.json()["choices"][0]["message"]["content"] or ""


def _first_token(http, text: str) -> int:
    return http.lm.tokenizer.encode(text)[0]


# field -> (value, OK/REFUSED, check(response, http) for OK fields). `stream` fields are checked on the body text.
CHAT = {
    "audio": ({"voice": "alloy", "format": "wav"}, REFUSED, None),
    "frequency_penalty": (0.5, OK, lambda r, h: r.json()["choices"][0]["message"]["content"] is not None),
    "function_call": ("auto", REFUSED, None),
    "functions": ([{"name": "f", "parameters": {"type": "object"}}], REFUSED, None),
    "logit_bias": (None, OK, None),  # built per test: a +100 bias makes a chosen token come first
    "logprobs": (True, OK, lambda r, h: r.json()["choices"][0]["logprobs"]["content"]),
    "max_completion_tokens": (2, OK, lambda r, h: r.json()["usage"]["completion_tokens"] <= 2),
    "max_tokens": (1, OK, lambda r, h: r.json()["usage"]["completion_tokens"] == 1),
    "messages": (MSG, OK, lambda r, h: r.json()["choices"][0]["message"]["role"] == "assistant"),
    "metadata": ({"k": "v"}, REFUSED, None),
    "modalities": (["text", "audio"], REFUSED, None),
    "model": ("smollm2", OK, lambda r, h: r.json()["model"] == "smollm2"),
    "moderation": ({"enabled": True}, REFUSED, None),
    "n": (2, OK, lambda r, h: len(r.json()["choices"]) == 2),
    "parallel_tool_calls": (False, REFUSED, None),  # refused without tools (with tools: test_structured_e2e)
    "prediction": ({"type": "content", "content": "hi"}, REFUSED, None),
    "presence_penalty": (0.5, OK, lambda r, h: r.status_code == 200),
    "prompt_cache_key": ("k", REFUSED, None),
    "prompt_cache_options": ({"x": 1}, REFUSED, None),
    "prompt_cache_retention": ("24h", REFUSED, None),
    "reasoning_effort": ("low", REFUSED, None),
    "response_format": ({"type": "json_object"}, OK,
                        lambda r, h: r.json()["choices"][0]["finish_reason"] == "length"
                        or isinstance(json.loads(_text(r)), dict)),
    "safety_identifier": ("user-1", OK, lambda r, h: r.status_code == 200),
    "seed": (7, OK, None),  # reproducibility checked separately
    "service_tier": ("flex", REFUSED, None),
    "stop": (["\n"], OK, lambda r, h: "\n" not in _text(r)),
    "store": (True, REFUSED, None),
    "stream": (True, OK, lambda r, h: r.text.rstrip().endswith("data: [DONE]")),
    "stream_options": ({"include_usage": True}, OK, None),  # with stream: usage chunk checked separately
    "temperature": (0.0, OK, None),  # greedy: checked with seed-independence below
    "tool_choice": ("required", REFUSED, None),  # refused without tools (with tools: test_structured_e2e)
    "tools": ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], OK,
              lambda r, h: r.json()["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")),
    "top_logprobs": (2, OK, None),  # needs logprobs: checked separately
    "top_p": (0.5, OK, lambda r, h: r.status_code == 200),
    "user": ("user-1", OK, lambda r, h: r.status_code == 200),
    "verbosity": ("low", REFUSED, None),
    "web_search_options": ({}, REFUSED, None),
}
# response_format json_schema (issue 12): served, the answer valid under the schema (more in test_structured_e2e).
CHAT_EXTRA = {
    "response_format_schema": ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
                               OK),
}
COMPLETION = {
    "best_of": (3, REFUSED, None),
    "echo": (True, OK, lambda r, h: r.json()["choices"][0]["text"].startswith("The sky")),
    "frequency_penalty": (0.5, OK, lambda r, h: r.status_code == 200),
    "logit_bias": (None, OK, None),
    "logprobs": (2, OK, lambda r, h: len(r.json()["choices"][0]["logprobs"]["top_logprobs"][0]) == 2),
    "max_tokens": (3, OK, lambda r, h: r.json()["usage"]["completion_tokens"] <= 3),
    "model": ("smollm2", OK, lambda r, h: r.json()["model"] == "smollm2"),
    "n": (2, OK, lambda r, h: len(r.json()["choices"]) == 2),
    "presence_penalty": (0.5, OK, lambda r, h: r.status_code == 200),
    "prompt": ("The sky is", OK, lambda r, h: r.json()["usage"]["prompt_tokens"] > 0),
    "seed": (3, OK, None),
    "stop": (["."], OK, lambda r, h: "." not in r.json()["choices"][0]["text"]),
    "stream": (True, OK, lambda r, h: r.text.rstrip().endswith("data: [DONE]")),
    "stream_options": ({"include_usage": True}, OK, None),
    "suffix": (" the end", REFUSED, None),
    "temperature": (0.0, OK, lambda r, h: r.status_code == 200),
    "top_p": (0.5, OK, lambda r, h: r.status_code == 200),
    "user": ("u", OK, lambda r, h: r.status_code == 200),
}
EMBEDDING = {
    "dimensions": (8, OK, lambda r, h: len(r.json()["data"][0]["embedding"]) == 8),
    "encoding_format": ("base64", OK, lambda r, h: isinstance(r.json()["data"][0]["embedding"], str)),
    "input": ("hello", OK, lambda r, h: len(r.json()["data"]) == 1),
    "model": ("smollm2", OK, lambda r, h: r.json()["model"] == "smollm2"),
    "user": ("u", OK, lambda r, h: r.status_code == 200),
}
BASE = {"chat": {"model": "smollm2", "messages": MSG, "max_tokens": 4, "temperature": 0},
        "completion": {"model": "smollm2", "prompt": "The sky is", "max_tokens": 4, "temperature": 0},
        "embedding": {"model": "smollm2", "input": "hello"}}
ROUTE = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "embedding": "/v1/embeddings"}


def test_the_tables_cover_every_openai_client_field():
    chat, comp, emb = _openai_types()
    # `stream` lives in the client's streaming / non-streaming subclasses of the base type.
    assert set(CHAT) == _fields(chat) | {"stream"}, set(CHAT) ^ _fields(chat)
    assert set(COMPLETION) | {"stream"} == _fields(comp) | {"stream"}, set(COMPLETION) ^ _fields(comp)
    assert set(EMBEDDING) == _fields(emb), set(EMBEDDING) ^ _fields(emb)


def _cases(kind, table):
    return [(kind, name, value, expect, check) for name, (value, expect, check) in table.items()]


@pytest.mark.parametrize("kind, name, value, expect, check",
                         _cases("chat", CHAT) + _cases("completion", COMPLETION) + _cases("embedding", EMBEDDING),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_openai_field(http, kind, name, value, expect, check):
    body = dict(BASE[kind])
    if name == "logit_bias":
        tok = _first_token(http, "Zebra")
        value = {str(tok): 100}
    body[name] = value
    if name == "top_logprobs":
        body["logprobs"] = True
    if name == "stream_options":
        body["stream"] = True
    r = http.post(ROUTE[kind], json=body)
    if expect == REFUSED:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == name and name in err["message"], err
        return
    assert r.status_code == 200, r.text
    if check is not None:
        assert check(r, http), r.text
    if name == "logit_bias":
        out = r.json()["choices"][0]
        text = (out.get("message") or {}).get("content") or out.get("text") or ""
        assert text.startswith(http.lm.tokenizer.decode([_first_token(http, "Zebra")])), text
    if name == "top_logprobs":
        assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    if name == "stream_options":
        chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_openai_seed_reproduces_and_unknown_fields_are_refused(http):
    body = dict(BASE["chat"], temperature=1.0, seed=11, max_tokens=8)
    a, b = http.post(ROUTE["chat"], json=body).json(), http.post(ROUTE["chat"], json=body).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    r = http.post(ROUTE["chat"], json=dict(BASE["chat"], frobnicate=1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    for name, (value, expect) in CHAT_EXTRA.items():
        r = http.post(ROUTE["chat"], json=dict(BASE["chat"], response_format=value))
        if expect == REFUSED:
            assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
        else:
            c = r.json()["choices"][0]
            assert r.status_code == 200 and (c["finish_reason"] == "length" or
                                             isinstance(json.loads(c["message"]["content"]), dict)), r.text


# ------------------------------------------------------------------------------------------------ messages
def test_openai_message_fields():
    import openai.types.chat as ch
    covered = {"content", "role", "name", "tool_calls", "tool_call_id", "refusal", "audio", "function_call"}
    for t in (ch.ChatCompletionUserMessageParam, ch.ChatCompletionAssistantMessageParam,
              ch.ChatCompletionToolMessageParam, ch.ChatCompletionSystemMessageParam,
              ch.ChatCompletionDeveloperMessageParam, ch.ChatCompletionFunctionMessageParam):
        assert _fields(t) <= covered, _fields(t) - covered


@pytest.mark.parametrize("message, param", [
    ({"role": "user", "content": "hi", "name": "bob"}, "messages[0].name"),
    ({"role": "assistant", "content": None, "audio": {"id": "a"}}, "messages[0].audio"),
    ({"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}},
     "messages[0].function_call"),
    ({"role": "function", "content": "x", "name": "f"}, "messages[0].role"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}, "messages[0].content"),
    ({"role": "tool", "content": "42", "tool_call_id": "call_1"}, "messages[0].tool_call_id"),  # no such call
])
def test_openai_message_fields_refused_by_name(http, message, param):
    r = http.post(ROUTE["chat"], json=dict(BASE["chat"], messages=[message]))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_openai_message_fields_implemented(http):
    # developer = system; text content parts are joined; an assistant refusal part is kept as text.
    a = http.post(ROUTE["chat"], json=dict(BASE["chat"], messages=[
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi."}]}]))
    b = http.post(ROUTE["chat"], json=dict(BASE["chat"], messages=[
        {"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Say hi."}]))
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
    assert a.json()["usage"] == b.json()["usage"]


# ------------------------------------------------------------------------------------------------ Ollama
def _ollama_fields(name) -> set[str]:
    import ollama._types as t
    return set(getattr(t, name).model_fields)


GENERATE = {
    "context": (None, OK, None),  # checked in test_ollama_context
    "format": ("json", OK, lambda r: r.json()["done_reason"] == "length"
               or isinstance(json.loads(r.json()["response"]), dict)),
    "height": (512, REFUSED, None),
    "images": (["aGVsbG8="], REFUSED, None),
    "keep_alive": ("1m", OK, lambda r: r.status_code == 200),
    "logprobs": (True, OK, lambda r: r.json()["logprobs"]),
    "model": ("smollm2", OK, lambda r: r.json()["model"] == "smollm2"),
    "options": ({"num_predict": 2}, OK, lambda r: r.json()["eval_count"] <= 2),
    "prompt": ("Why is the sky blue?", OK, lambda r: r.json()["prompt_eval_count"] > 0),
    "raw": (True, OK, lambda r: r.json()["prompt_eval_count"] < 12),
    "steps": (4, REFUSED, None),
    "stream": (False, OK, lambda r: r.json()["done"] is True),
    "suffix": ("end", REFUSED, None),
    "system": ("You are terse.", OK, lambda r: r.status_code == 200),
    "template": ("{{ .Prompt }}", REFUSED, None),
    "think": (True, REFUSED, None),
    "top_logprobs": (2, OK, lambda r: len(r.json()["logprobs"][0]["top_logprobs"]) == 2),
    "width": (512, REFUSED, None),
}
CHAT_OL = {
    "format": ("json", OK, lambda r: r.json()["done_reason"] == "length"
               or isinstance(json.loads(r.json()["message"]["content"]), dict)),
    "keep_alive": (60, OK, lambda r: r.status_code == 200),
    "logprobs": (True, OK, lambda r: r.json()["logprobs"]),
    "messages": (MSG, OK, lambda r: r.json()["message"]["role"] == "assistant"),
    "model": ("smollm2", OK, lambda r: r.json()["model"] == "smollm2"),
    "options": ({"num_predict": 2}, OK, lambda r: r.json()["eval_count"] <= 2),
    "stream": (False, OK, lambda r: r.json()["done"] is True),
    "think": (True, REFUSED, None),
    "tools": ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], OK,
              lambda r: r.json()["done"] is True),
    "top_logprobs": (2, OK, lambda r: len(r.json()["logprobs"][0]["top_logprobs"]) == 2),
}
EMBED_OL = {
    "dimensions": (8, OK, lambda r: len(r.json()["embeddings"][0]) == 8),
    "input": (["a", "b"], OK, lambda r: len(r.json()["embeddings"]) == 2),
    "keep_alive": ("1m", OK, lambda r: r.status_code == 200),
    "model": ("smollm2", OK, lambda r: r.json()["model"] == "smollm2"),
    "options": ({"num_ctx": 64}, OK, lambda r: r.status_code == 200),
    "truncate": (False, OK, lambda r: r.status_code == 200),
}
# Ollama options: implemented ones change the result as Ollama's do; the rest are refused by name.
OPTIONS_OK = {"num_ctx", "num_predict", "temperature", "top_k", "top_p", "min_p", "repeat_penalty",
              "repeat_last_n", "presence_penalty", "frequency_penalty", "seed", "stop"}
OL_BASE = {"generate": {"model": "smollm2", "prompt": "Why is the sky blue?", "stream": False,
                        "options": {"num_predict": 4, "temperature": 0}},
           "chat": {"model": "smollm2", "messages": MSG, "stream": False, "options": {"num_predict": 4,
                                                                                      "temperature": 0}},
           "embed": {"model": "smollm2", "input": "hello"}}


def test_the_tables_cover_every_ollama_client_field():
    assert set(GENERATE) == _ollama_fields("GenerateRequest")
    assert set(CHAT_OL) == _ollama_fields("ChatRequest")
    assert set(EMBED_OL) == _ollama_fields("EmbedRequest")
    assert _ollama_fields("Options") >= OPTIONS_OK - {"min_p"}  # Ollama's server has min_p; this client not


@pytest.mark.parametrize("route, name, value, expect, check",
                         [("generate", *c) for c in [(k, *v) for k, v in GENERATE.items()]]
                         + [("chat", *c) for c in [(k, *v) for k, v in CHAT_OL.items()]]
                         + [("embed", *c) for c in [(k, *v) for k, v in EMBED_OL.items()]],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_ollama_field(http, route, name, value, expect, check):
    if name == "context":
        return  # covered by test_ollama_context
    body = json.loads(json.dumps(OL_BASE[route]))
    if name == "options":
        body["options"] = value
    else:
        body[name] = value
    if name == "top_logprobs":
        body["logprobs"] = True
    r = http.post(f"/api/{route}", json=body)
    if expect == REFUSED:
        assert r.status_code == 400, r.text
        assert name in r.json()["error"], r.text
        return
    assert r.status_code == 200, r.text
    if name == "stream" or body.get("stream") is False or route == "embed":
        assert check(r), r.text


@pytest.mark.parametrize("option", sorted(_ollama_fields("Options") - OPTIONS_OK))
def test_unimplemented_ollama_options_are_refused(http, option):
    body = dict(OL_BASE["generate"], options={"num_predict": 2, option: 1})
    r = http.post("/api/generate", json=body)
    assert r.status_code == 400 and f"options.{option}" in r.json()["error"], r.text


def test_ollama_context_continues_the_exchange(http):
    a = http.post("/api/generate", json=OL_BASE["generate"]).json()
    b = http.post("/api/generate", json=dict(OL_BASE["generate"], prompt="And why at sunset?",
                                             context=a["context"])).json()
    assert b["prompt_eval_count"] > len(a["context"])
    assert b["context"][:len(a["context"])] == a["context"]
    # The new turn is encoded exactly as it would be alone, minus a BOS the tokenizer itself adds.
    alone = http.post("/api/generate", json=dict(OL_BASE["generate"], prompt="And why at sunset?")).json()
    turn = alone["context"][:alone["prompt_eval_count"]]
    tok = http.lm.tokenizer
    if tok.add_bos and turn[:1] == [tok.bos_id]:
        turn = turn[1:]
    assert b["context"][len(a["context"]):len(a["context"]) + len(turn)] == turn


def test_ollama_message_fields():
    covered = {"role", "content", "images", "thinking", "tool_name", "tool_calls"}
    assert _ollama_fields("Message") <= covered
