"""Tool calling through the seam: enforced choices with a random model (arguments judged by `jsonschema`), the
auto-mode trigger, "none", the output filter's streaming deltas, and the bad-input refusals."""
from __future__ import annotations

import json
import jsonschema
import pytest

from llamaforge.errors import InvalidRequestError
from llamaforge.generate import pipeline
from llamaforge.generate.api import build_request, chat
from llamaforge.generate.constraints import engine
from llamaforge.generate.request import Tool
from llamaforge.generate.stage import Output
from llamaforge.generate.tools.grammar import calls_lark
from llamaforge.generate.tools.output import ToolCallFilter
from llamaforge.generate.tools.processor import Channel
from llamaforge.tokenizer import tool_format
from llamaforge.tokenizer.load import load_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                     "unit": {"enum": ["celsius", "fahrenheit"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": {
    "type": "object", "properties": {"tz": {"$ref": "#/$defs/zone"}}, "required": ["tz"],
    "additionalProperties": False, "$defs": {"zone": {"enum": ["UTC", "CET", "PST"]}}}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tiny(smollm2_gguf):
    from conftest import make_tiny_hf
    from llamaforge.api import LoadedModel
    from llamaforge.config import ModelConfig
    from llamaforge.model import Llama
    tok = load_tokenizer(smollm2_gguf)
    hf = make_tiny_hf("llama32", vocab_size=tok.vocab_size, seed=4)
    cfg = ModelConfig.from_hf_config({**hf.config.to_dict(), "max_position_embeddings": 2048})
    model = Llama(cfg)
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    return LoadedModel(config=cfg, model=model.eval(), tokenizer=tok, name="tiny")


def _valid_calls(calls, only=None):
    assert calls
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        name = c["function"]["name"]
        assert name in SCHEMAS and (only is None or name == only)
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_enforced_choices_always_parse_and_validate(tiny, choice, temperature):
    for seed in range(2 if temperature else 1):
        out = chat(tiny, ASK, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False,
                   max_tokens=64, temperature=temperature, seed=seed)
        assert out.finish_reason == "tool_calls" and out.text == ""
        assert len(out.tool_calls) == 1
        _valid_calls(out.tool_calls, None if choice == "required" else choice)


def test_streamed_deltas_join_to_the_arguments(tiny):
    """As the server runs it: the engine's raw text deltas through the plan's output stages."""
    from llamaforge.generate.engine import BatchEngine
    plan = pipeline.plan(tiny, build_request(messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                             max_tokens=120, temperature=0.9, seed=3), context_length=1024)
    eng = BatchEngine(tiny, max_batch=1, max_seq_len=1024)
    req = eng.add(plan.prompt_ids, plan.params, plan.processors())
    out = plan.output()
    deltas = []
    result = None
    while eng.has_work():
        for _, ev in eng.step():
            deltas += out.feed(ev.text)
            if ev.finish_reason is not None:
                tail, result = out.finish(ev.finish_reason)
                deltas += tail
    assert req.done and result.finish_reason == "tool_calls" and result.text == ""
    _valid_calls(result.tool_calls)
    # OpenAI's streaming shape: the first delta of each call has index, id, type and the name; then arguments.
    frags = [tc for d in deltas for tc in (d.tool_calls or [])]
    heads = [f for f in frags if "id" in f]
    assert len(heads) == len(result.tool_calls)
    assert all(f["type"] == "function" and f["function"]["arguments"] == "" for f in heads)
    for i, call in enumerate(result.tool_calls):
        assert heads[i]["id"] == call["id"] and heads[i]["function"]["name"] == call["function"]["name"]
        joined = "".join(f["function"].get("arguments", "") for f in frags if f["index"] == i)
        assert joined == call["function"]["arguments"]
        jsonschema.validate(json.loads(joined), SCHEMAS[call["function"]["name"]])


class _Spell:
    """A caller's processor that makes the model start its answer with `text` (then lets it be)."""

    def __init__(self, tok, text: str):
        self.ids = tok.encode(text)
        self.start = None

    def __call__(self, token_ids, logits):
        if self.start is None:
            self.start = len(token_ids)
        k = len(token_ids) - self.start
        if k < len(self.ids):
            logits[self.ids[k]] += 1000.0
        return logits


def test_auto_call_opened_by_the_model_is_completed_and_returned(tiny):
    outs = [chat(tiny, ASK, tools=[WEATHER, TIME], max_tokens=100, temperature=t, seed=s,
                 logits_processors=[_Spell(tiny.tokenizer, "Let me check.\n<tool_call>\n")])
            for t, s in ((0.0, 0), (0.8, 1), (0.8, 2))]
    for out in outs:
        assert out.text == "Let me check.\n", out.text       # the call's text never reaches the content
        assert out.finish_reason == "tool_calls"
        _valid_calls(out.tool_calls)


def test_auto_without_a_call_is_plain_text(tiny):
    out = chat(tiny, ASK, tools=[WEATHER], max_tokens=12, temperature=0.0,
               logits_processors=[_Spell(tiny.tokenizer, "Sunny <tool is a word")])
    assert out.tool_calls == [] and out.text.startswith("Sunny <tool is a word")


def test_none_never_calls(tiny):
    push = _Spell(tiny.tokenizer, "<tool_call>\n")
    out = chat(tiny, ASK, tools=[WEATHER], tool_choice="none", max_tokens=16, temperature=0.0,
               logits_processors=[push])
    assert out.tool_calls == [] and "<tool_call>" not in out.text
    plan = pipeline.plan(tiny, build_request(messages=ASK, tools=[WEATHER], tool_choice="none"))
    assert "get_weather" not in tiny.tokenizer.decode(plan.prompt_ids)  # not offered either


def test_parallel_calls_and_a_round_trip(tiny):
    out = chat(tiny, ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200, temperature=1.0,
               seed=7, logits_processors=[_Spell(tiny.tokenizer, '<tool_call>\n{"name": "get_time", '
                                                                 '"arguments": {"tz": "UTC"}}\n</tool_call>\n')])
    assert len(out.tool_calls) >= 2 and out.tool_calls[0]["function"]["name"] == "get_time"
    _valid_calls(out.tool_calls)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": out.tool_calls}] + [
        {"role": "tool", "tool_call_id": c["id"], "content": '{"ok": true}'} for c in out.tool_calls]
    plan = pipeline.plan(tiny, build_request(messages=history, tools=[WEATHER, TIME]))
    text = tiny.tokenizer.decode(plan.prompt_ids, skip_special=False)
    assert text.count("<tool_response>") == len(out.tool_calls)
    again = chat(tiny, history, tools=[WEATHER, TIME], max_tokens=4, temperature=0)
    assert again.finish_reason in ("length", "stop", "tool_calls")


def test_tools_with_a_response_format(tiny):
    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for seed in range(3):
        out = chat(tiny, ASK, tools=[WEATHER], json_schema=answer, max_tokens=60, temperature=1.0, seed=seed)
        if out.tool_calls:
            _valid_calls(out.tool_calls)
        elif out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), answer)


# ------------------------------------------------------------------------------------------- the output filter
def _run_filter(flt, text: str, chunk: int, channel_at=None, channel=None):
    o = Output([flt], [])
    deltas = []
    for i in range(0, len(text), chunk):
        if channel is not None and channel_at is not None and i + chunk > channel_at:
            channel.call_start = channel_at  # the processor saw the control token before this text
        deltas += o.feed(text[i:i + chunk])
    tail, result = o.finish("stop")
    return deltas + tail, result


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_filter_splits_text_and_calls_at_any_delta_boundary(chunk):
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    text = f"Checking <b>now</b>.\n<tool_call>\n{call}\n</tool_call>\n<tool_call>\n{call}\n</tool_call>"
    deltas, result = _run_filter(ToolCallFilter(tool_format.HERMES, "auto"), text, chunk)
    assert result.text == "Checking <b>now</b>.\n" and result.finish_reason == "tool_calls"
    assert [c["function"]["arguments"] for c in result.tool_calls] == [
        '{"city": "Oslo", "unit": "celsius"}'] * 2
    assert len({c["id"] for c in result.tool_calls}) == 2


def test_filter_releases_a_false_start_and_keeps_llama3_control_openers():
    deltas, result = _run_filter(ToolCallFilter(tool_format.HERMES, "auto"), "a <tool_cal b", 2)
    assert result.text == "a <tool_cal b" and not result.tool_calls
    ch = Channel()
    text = 'Sure.{"type": "function", "name": "get_time", "parameters": {"tz": "UTC"}}'
    deltas, result = _run_filter(ToolCallFilter(tool_format.LLAMA3_JSON, "auto", ch), text, 4, channel_at=5,
                                 channel=ch)
    assert result.text == "Sure." and result.tool_calls[0]["function"]["name"] == "get_time"
    assert json.loads(result.tool_calls[0]["function"]["arguments"]) == {"tz": "UTC"}
    deltas, result = _run_filter(ToolCallFilter(tool_format.LLAMA3_HF, "auto"),
                                 '{"name": "get_time", "parameters": {"tz": "CET"}}', 3)
    assert result.text == "" and result.tool_calls[0]["function"]["name"] == "get_time"


def test_cut_call_is_length_not_text():
    flt = ToolCallFilter(tool_format.HERMES, "forced")
    o = Output([flt], [])
    o.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os')
    _, result = o.finish("length")
    assert result.finish_reason == "length" and result.text == ""
    assert result.tool_calls[0]["function"]["arguments"] == '{"city": "Os'


# ------------------------------------------------------------------------------------------- Llama 3 grammar
def test_llama3_call_grammar_with_python_tag(llama3_tokenizer_model):
    tok = load_tokenizer(llama3_tokenizer_model)
    tools = [Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
             for t in (WEATHER, TIME)]
    g = engine.compile_grammar(tok, "lark", engine.lark_grammar(
        calls_lark(tools, tool_format.LLAMA3_JSON, parallel=True)))
    tag = tok.special_tokens["<|python_tag|>"]
    good = '{"type": "function", "name": "get_time", "parameters": {"tz": "CET"}}'
    m = g.matcher()
    assert m.consume_tokens([tag] + tok.encode(good + "; " + good.replace("CET", "UTC"))) and m.is_accepting()
    for bad in ['{"type": "function", "name": "get_time", "parameters": {"tz": "EST"}}',
                '{"name": "get_time", "parameters": {"tz": "CET"}}',
                '{"type": "function", "name": "nope", "parameters": {}}']:
        m = g.matcher()
        assert not (m.try_consume_tokens([tag] + tok.encode(bad)) == len(tok.encode(bad)) + 1 and m.is_accepting())
    m = g.matcher()
    assert m.try_consume_tokens(tok.encode(good)) == 0  # the call must open with the control token


def _feed_processor(proc, prompt, generated, vocab):
    """Drive a logits processor as the engine does: the prompt, then one sampled id at a time."""
    import torch
    ids = list(prompt)
    proc(ids, torch.zeros(vocab))
    for t in generated:
        ids.append(t)
        proc(ids, torch.zeros(vocab))


def test_processor_reports_where_the_calls_begin(llama3_tokenizer_model, smollm2_gguf):
    """The channel offset the output filter cuts at: a control-token opener leaves no text, so the processor
    reports it (forced: at 0; auto: after the answer text); a text opener in forced mode needs no report."""
    from llamaforge.generate.tools.processor import CallProcessor
    tools = [Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
             for t in (WEATHER, TIME)]
    call = '{"type": "function", "name": "get_time", "parameters": {"tz": "CET"}}'
    tok = load_tokenizer(llama3_tokenizer_model)
    tag = tok.special_tokens["<|python_tag|>"]
    g = engine.compile_grammar(tok, "lark", engine.lark_grammar(
        calls_lark(tools, tool_format.LLAMA3_JSON, parallel=True)))
    prompt = tok.encode("Weather?")
    for forced, before in [(True, ""), (False, "Sure, one moment.")]:
        ch = Channel()
        proc = CallProcessor(g, tool_format.LLAMA3_JSON, tok, tok.stop_ids, ch, forced=forced)
        _feed_processor(proc, prompt, tok.encode(before) + [tag] + tok.encode(call), tok.vocab_size)
        assert ch.call_start == len(before) and not proc.inner.failed and proc.inner.matcher.is_accepting()
    hermes_tok = load_tokenizer(smollm2_gguf)
    g = engine.compile_grammar(hermes_tok, "lark", engine.lark_grammar(
        calls_lark(tools, tool_format.HERMES, parallel=False)))
    call = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'
    for forced, before, start in [(True, "", None), (False, "Let me check. ", len("Let me check. "))]:
        ch = Channel()
        proc = CallProcessor(g, tool_format.HERMES, hermes_tok, hermes_tok.stop_ids, ch, forced=forced)
        _feed_processor(proc, hermes_tok.encode("Hi"), hermes_tok.encode(before + call), hermes_tok.vocab_size)
        assert ch.call_start == start and not proc.inner.failed and proc.inner.matcher.is_accepting()
        # what the filter makes of that text with this channel: the same calls either way
        flt = ToolCallFilter(tool_format.HERMES, "forced" if forced else "auto", ch)
        _, result = _run_filter(flt, before + call, 5)
        assert result.text == before and result.tool_calls[0]["function"]["arguments"] == '{"tz": "UTC"}'


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, field", [
    (dict(tools=[WEATHER], tool_choice="get_wether"), "tool_choice"),
    (dict(tools=[], tool_choice="required"), "tool_choice"),
    (dict(tools=[{"name": "bad name!", "parameters": {"type": "object"}}]), "tools[0].function.name"),
    (dict(tools=[WEATHER, WEATHER]), "tools[1].function.name"),
    (dict(tools=[{"name": "f", "parameters": {"type": "array"}}]), "tools[0].function.parameters"),
    (dict(tools=[{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}]),
     "tools[0].function.parameters"),
    (dict(tools=[{"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "array", "uniqueItems": True}}}}]), "tools[0].function.parameters"),
    (dict(tools=[WEATHER], regex="a+"), "regex"),
])
def test_bad_tool_requests_name_the_field(tiny, kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        pipeline.plan(tiny, build_request(messages=ASK, **kwargs))
    assert e.value.field == field, (e.value.field, str(e.value))


def test_tool_messages_must_answer_an_earlier_call(tiny):
    call = {"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "A"}'}}
    ok = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_x", "content": "sunny"}]
    pipeline.plan(tiny, build_request(messages=ok, tools=[WEATHER]))
    for bad, field in [
        (ASK + [{"role": "tool", "tool_call_id": "call_x", "content": "sunny"}], "messages[1].tool_call_id"),
        (ok[:2] + [{"role": "tool", "tool_call_id": "call_y", "content": "sunny"}], "messages[2].tool_call_id"),
        (ok[:2] + [{"role": "tool", "content": "sunny"}], "messages[2].tool_call_id"),
        (ASK + [{"role": "assistant", "content": None, "tool_calls": [
            dict(call, function={"name": "get_weather", "arguments": "{not json"})]}], 
         "messages[1].tool_calls[0].function.arguments"),
    ]:
        with pytest.raises(InvalidRequestError) as e:
            pipeline.plan(tiny, build_request(messages=bad, tools=[WEATHER]))
        assert e.value.field == field, (e.value.field, str(e.value))
    with pytest.raises(InvalidRequestError) as e:
        pipeline.plan(tiny, build_request(prompt="x", tools=[WEATHER]))
    assert e.value.field == "tools"
