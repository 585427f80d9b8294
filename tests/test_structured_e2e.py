"""Structured output and tool calling end to end: `llamaforge serve` on SmolLM2 driven by the official `openai` and
`ollama` clients (and raw HTTP for the bad input). Outputs are judged by `jsonschema`, never by our own grammar."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from llamaforge.server.app import ServerConfig, create_app
from test_server_e2e import Running

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["colour", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"$defs": {"city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                          "country": {"type": "string", "pattern": "^[A-Z]{2}$"}},
                        "required": ["name", "country"], "additionalProperties": False}},
     "type": "object", "properties": {"home": {"$ref": "#/$defs/city"}, "note": {"type": ["string", "null"],
                                                                                 "maxLength": 10}},
     "required": ["home", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "integer", "minimum": -50, "maximum": 50},
                                                           {"const": "unknown"}]}},
     "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10}},
     "required": ["score"], "additionalProperties": False},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the local time in a city",
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string", "maxLength": 20}}, "required": ["city"],
                                             "additionalProperties": False}}}
PARAMS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def srv(smollm2_gguf):
    import llamaforge
    torch.set_num_threads(2)
    lm = llamaforge.load(str(smollm2_gguf), compile=False)
    r = Running(create_app(ServerConfig(max_batch=8, max_queue=32, ctx=1024), preloaded={"smollm2": lm}))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def oa(srv):
    from openai import OpenAI
    return OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def ol(srv):
    import ollama
    return ollama.Client(host=srv.url, timeout=600)


def _ask_schema(oa, schema, temperature, seed=0):
    r = oa.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Give an example as JSON."}], max_tokens=160,
        temperature=temperature, seed=seed,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    return r.choices[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_openai_json_schema_outputs_validate(oa, temperature):
    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # the server batches them
        choices = list(pool.map(lambda s: _ask_schema(oa, s, temperature), SCHEMAS))
    for schema, c in zip(SCHEMAS, choices):
        assert c.finish_reason == "stop", (schema, c.message.content)
        jsonschema.validate(json.loads(c.message.content), schema)


def test_ollama_format_schema_and_json(ol):
    def ask(fmt, temperature):
        return ol.chat(model="smollm2", messages=[{"role": "user", "content": "Describe a city as JSON."}],
                       format=fmt, options={"temperature": temperature, "num_predict": 160, "seed": 3})
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda a: ask(*a), [(SCHEMAS[3], 0.0), (SCHEMAS[1], 0.8), ("json", 0.0),
                                                 (SCHEMAS[0], 0.8)]))
    for (fmt, _), r in zip([(SCHEMAS[3], 0), (SCHEMAS[1], 0), ("json", 0), (SCHEMAS[0], 0)], outs):
        assert r.done_reason == "stop", r.message.content
        value = json.loads(r.message.content)
        if fmt == "json":
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, fmt)


# Hypothesis-generated schemas: bounded (every string, array and number limited) so an answer always fits.
_leaf = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(1, 8)),
    st.builds(lambda lo, w: {"type": "integer", "minimum": lo, "maximum": lo + w}, st.integers(-100, 100),
              st.integers(0, 50)),
    st.just({"type": "boolean"}),
    st.builds(lambda vs: {"enum": vs}, st.lists(st.sampled_from(["a", "bb", "c c", 1, 2.5, None, True]),
                                                min_size=1, max_size=4, unique=True)),
    st.builds(lambda n: {"type": ["string", "null"], "maxLength": n}, st.integers(1, 6)),
)


def _obj(children):
    return st.builds(lambda props, req: {"type": "object", "properties": props,
                                         "required": sorted(k for k in props if req.get(k)),
                                         "additionalProperties": False},
                     st.dictionaries(st.sampled_from(["a", "b", "name", "x_1", "value"]), children, min_size=1,
                                     max_size=3),
                     st.dictionaries(st.sampled_from(["a", "b", "name", "x_1", "value"]), st.booleans()))


_schema = _obj(st.one_of(_leaf, _obj(_leaf), st.builds(lambda s, n: {"type": "array", "items": s, "maxItems": n},
                                                        _leaf, st.integers(1, 3))))


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schema, temperature=st.sampled_from([0.0, 0.8]))
def test_hypothesis_schemas_validate(oa, schema, temperature):
    c = _ask_schema(oa, schema, temperature)
    assert c.finish_reason == "stop", (schema, c.message.content)
    jsonschema.validate(json.loads(c.message.content), schema)


# ------------------------------------------------------------------------------------------------ tools
def _check_calls(calls, only=None):
    assert calls
    for c in calls:
        assert c.type == "function" and c.id
        assert c.function.name in PARAMS and (only is None or c.function.name == only)
        jsonschema.validate(json.loads(c.function.arguments), PARAMS[c.function.name])


def test_openai_tool_choice_required_named_and_none(oa):
    def ask(choice, temperature):
        return oa.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                          max_tokens=80, temperature=temperature, seed=1).choices[0]
    cases = [("required", 0.0), ("required", 0.8), ({"type": "function", "function": {"name": "get_time"}}, 0.8),
             ("none", 0.0)]
    with ThreadPoolExecutor(len(cases)) as pool:
        required0, required8, named, none = pool.map(lambda a: ask(*a), cases)
    for c in (required0, required8):
        assert c.finish_reason == "tool_calls" and not c.message.content
        _check_calls(c.message.tool_calls)
    assert named.finish_reason == "tool_calls"
    _check_calls(named.message.tool_calls, "get_time")
    assert not none.message.tool_calls and none.finish_reason in ("stop", "length")
    assert "<tool_call>" not in (none.message.content or "")


def test_openai_two_step_round_trip(oa):
    first = oa.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required",
                                       max_tokens=80, temperature=0).choices[0]
    assert first.finish_reason == "tool_calls"
    call = first.message.tool_calls[0]
    history = ASK + [first.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22, "sky": "clear"}'}]
    second = oa.chat.completions.create(model="smollm2", messages=history, tools=[WEATHER], max_tokens=40,
                                        temperature=0).choices[0]
    assert second.finish_reason in ("stop", "length", "tool_calls")
    if second.finish_reason != "tool_calls":
        assert second.message.content and second.message.content.strip()


def test_openai_streamed_tool_call_deltas(oa):
    stream = oa.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME],
                                        tool_choice="required", max_tokens=80, temperature=0.8, seed=5, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        ch = chunk.choices[0]
        for d in ch.delta.tool_calls or []:
            cur = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
            if d.id:
                assert cur["id"] is None and d.type == "function" and d.function.name
                cur["id"], cur["name"] = d.id, d.function.name
            cur["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
    assert finish == "tool_calls" and calls
    for c in calls.values():
        assert c["id"] and c["name"] in PARAMS
        jsonschema.validate(json.loads(c["arguments"]), PARAMS[c["name"]])


def test_ollama_tools(ol):
    r = ol.chat(model="smollm2", messages=ASK, tools=[WEATHER], options={"temperature": 0, "num_predict": 80})
    # Ollama has no tool_choice: the model chooses; a call it makes is returned as a call, never as text.
    if r.message.tool_calls:
        for c in r.message.tool_calls:
            assert c.function.name == "get_weather" and isinstance(c.function.arguments, dict)
            jsonschema.validate(dict(c.function.arguments), PARAMS["get_weather"])
        assert "<tool_call>" not in (r.message.content or "")
    else:
        assert r.message.content and "<tool_call>" not in r.message.content


# ------------------------------------------------------------------------------------------------ bad input
def _post(srv, body):
    return httpx.post(srv.url + "/v1/chat/completions", json=dict({"model": "smollm2", "max_tokens": 4}, **body),
                      timeout=120)


def test_bad_structured_requests_are_400s_naming_the_field(srv, monkeypatch):
    cases = [
        ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integr"}}}}}},
         "response_format.json_schema.schema", "#/properties/a/type"),
        ({"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format.json_schema.schema", "'uniqueItems'"),
        ({"messages": ASK, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "'nope'"),
        ({"messages": ASK + [{"role": "tool", "tool_call_id": "call_zzz", "content": "x"}], "tools": [WEATHER]},
         "messages[1].tool_call_id", "call_zzz"),
        ({"messages": ASK, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "strin"}}}}}]},
         "tools[0].function.parameters", "#/properties/a/type"),
    ]
    for body, param, needle in cases:
        r = _post(srv, body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and needle in err["message"], err
    r = httpx.post(srv.url + "/api/chat", json={"model": "smollm2", "messages": ASK, "stream": False,
                                                "format": {"type": "object", "properties": {"a": {"not": {}}}}})
    assert r.status_code == 400 and "'not'" in r.text, r.text
    # A grammar too slow to compile: refused at the deadline, and the server keeps serving.
    from llamaforge.generate.constraints import engine
    monkeypatch.setattr(engine, "COMPILE_SECONDS", 0.01)
    slow = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(4000)},
            "required": [f"p{i}" for i in range(0, 4000, 3)]}
    r = _post(srv, {"messages": ASK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "slow", "schema": slow}}})
    assert r.status_code == 400 and "longer than" in r.json()["error"]["message"]
    monkeypatch.undo()
    r = _post(srv, {"messages": ASK})
    assert r.status_code == 200
