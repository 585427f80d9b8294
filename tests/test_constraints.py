"""Constrained decoding (generate/constraints): the llguidance bridge on real vocabularies, JSON Schema coverage
and refusals judged against the `jsonschema` package, the per-row logits processor judged against Python's `re`
over the whole vocabulary, and generation through the seam with a tiny random model on SmolLM2's tokenizer (a
random model is the harshest user of a grammar: nothing but the mask keeps its output valid).
"""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from llamaforge.errors import InvalidRequestError
from llamaforge.generate import pipeline
from llamaforge.generate.api import build_request, chat, generate
from llamaforge.generate.constraints import engine
from llamaforge.generate.constraints.processor import GrammarLogitsProcessor, allowed_ids
from llamaforge.generate.constraints.stage import constraint_grammar
from llamaforge.generate.engine import BatchEngine
from llamaforge.generate.request import Constraint
from llamaforge.tokenizer.load import load_tokenizer

FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def tiny(smol_tok):
    """A random 2-layer Llama over SmolLM2's 49,152-token vocabulary."""
    from conftest import make_tiny_hf
    from llamaforge.api import LoadedModel
    from llamaforge.config import ModelConfig
    from llamaforge.model import Llama
    hf = make_tiny_hf("llama32", vocab_size=smol_tok.vocab_size, seed=3)
    cfg = ModelConfig.from_hf_config({**hf.config.to_dict(), "max_position_embeddings": 512})
    model = Llama(cfg)
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    return LoadedModel(config=cfg, model=model.eval(), tokenizer=smol_tok, name="tiny")


def grammar(tok, kind="json_schema", **kw):
    return constraint_grammar(tok, Constraint(kind, **kw))


def dumps(x) -> str:
    return json.dumps(x, ensure_ascii=False)


# ------------------------------------------------------------------------------------ the JSON-object grammar
# (these cases were the hand-written recogniser's; the engine's grammar must agree with them and with `json`)
@pytest.fixture(scope="module")
def json_object(smol_tok):
    return grammar(smol_tok, "json")


@pytest.mark.parametrize("text", ['{}', '{"a": 1}', '{"a": [1, 2.5e-3, -0, true, false, null, "x\\n\\u00e9"]}',
                                  '{"a": {"b": {}}, "c": []}', '{ "k" : "v" }', '{\n  "a": 1\n}'])
def test_json_object_accepts_valid_objects(json_object, text):
    assert json_object.check(text) == (True, True)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("text", ['[1]', '"x"', '{a: 1}', '{"a" 1}', '{"a": 01}', '{"a": 1,}', '{"a": tru }',
                                  '{"a": 1}}', '{"a": "\x01"}', '{"a": 1} x', '{"a": -}', '{"a": 1.}', '{"a":\\}',
                                  ' {"a": 1}', '{"a":      1}'])
def test_json_object_rejects_invalid(json_object, text):
    assert json_object.check(text)[1] is False


def test_json_object_incomplete_is_not_complete(json_object):
    for text in ['{', '{"a"', '{"a": ', '{"a": [1', '{"a": "x']:
        assert json_object.check(text) == (True, False)


# llguidance keeps a raw DEL (U+007F) out of strings (the escape \u007f is allowed): a narrowing, not a
# relaxation, and the one JSON text json.dumps writes that the grammar refuses.
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x7f"), max_size=8)
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                     | _text, lambda ch: st.lists(ch, max_size=3)
                     | st.dictionaries(_text, ch, max_size=3), max_leaves=8)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(_text, _json, max_size=4), st.sampled_from([None, 1]), st.booleans())
def test_json_object_agrees_with_json_module(json_object, obj, indent, ascii_only):
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    # SmolLM2's vocabulary has no token for some bytes (0xF1, 0xF2, ...): text it cannot spell is not a test.
    assume(json_object.lltok.decode_bytes(json_object.lltok.greedy_tokenize(text)) == text.encode())
    assert json_object.check(text) == (True, True)
    if len(text) > 2:
        assert json_object.check(text[:-1]) == (True, False)


# ------------------------------------------------------------------------------------ JSON Schema coverage
# keyword -> (schema, valid instance, invalid instances); `jsonschema` confirms each classification first.
COVERAGE = {
    "$ref/$defs": ({"$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                    "additionalProperties": False}},
                    "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}}, "required": ["a"],
                    "additionalProperties": False}, {"a": {"x": 1}}, [{"a": {"x": "s"}}, {"a": {}}]),
    "recursive $ref": ({"$defs": {"n": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "required": ["v"],
        "additionalProperties": False}}, "$ref": "#/$defs/n"}, {"v": 1, "kids": [{"v": 2, "kids": []}]},
        [{"v": 1, "kids": [{"w": 2}]}]),
    "definitions (draft 7)": ({"$schema": "http://json-schema.org/draft-07/schema#",
                               "definitions": {"x": {"type": "integer"}}, "$ref": "#/definitions/x"}, 1, ["a"]),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, "ab", ["abc", 1.5]),
    "oneOf": ({"oneOf": [{"type": "object", "properties": {"t": {"const": "a"}, "n": {"type": "integer"}},
                          "required": ["t", "n"], "additionalProperties": False},
                         {"type": "object", "properties": {"t": {"const": "b"}, "s": {"type": "string"}},
                          "required": ["t", "s"], "additionalProperties": False}]},
              {"t": "b", "s": "x"}, [{"t": "b", "n": 1}, {"t": "c", "s": "x"}]),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
              {"a": 1, "b": "x"}, [{"a": 1}, {"b": "x"}]),
    "enum": ({"enum": ["red", "green", 3, None]}, "green", ["blue", 4]),
    "const": ({"type": "object", "properties": {"v": {"const": 42}}, "required": ["v"],
               "additionalProperties": False}, {"v": 42}, [{"v": 43}]),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "AB-123", ["AB-12", "ab-123"]),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 4}, "abé", ["a", "abcde"]),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2],
                          [[1], [1, 2, 3, 4], [1, "a"]]),
    "minimum/maximum": ({"type": "integer", "minimum": 10, "maximum": 20}, 15, [9, 21, 100, 15.5]),
    "exclusiveMinimum/Maximum": ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1.5}, 0.5,
                                 [0, -1, 1.5, 2]),
    "additionalProperties: false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, {"a": 1}, [{"a": 1, "b": 2}]),
    "additionalProperties: schema": ({"type": "object", "additionalProperties": {"type": "integer"}}, {"x": 1},
                                     [{"x": "a"}]),
    "type union with null": ({"type": ["string", "null"]}, None, [1, True]),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["b"], "additionalProperties": False}, {"b": 1}, [{"a": 1}, {}]),
    "minProperties/maxProperties": ({"type": "object", "additionalProperties": {"type": "integer"},
                                     "minProperties": 1, "maxProperties": 2}, {"a": 1}, [{}, {"a": 1, "b": 2, "c": 3}]),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
                    [1, "a"], [["a", 1], [1, "a", 2]]),
    "format: date": ({"type": "string", "format": "date"}, "2024-02-29", ["yesterday", "2024-13-01"]),
    "format: ipv4": ({"type": "string", "format": "ipv4"}, "10.0.0.255", ["10.0.0.256", "1.2.3"]),
    "format: email": ({"type": "string", "format": "email"}, "a@b.co", ["not an email"]),
    "format: uuid": ({"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", ["123"]),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 15, [7]),
}


@pytest.mark.parametrize("keyword", list(COVERAGE))
def test_schema_keyword_is_enforced(smol_tok, keyword):
    schema, valid, invalids = COVERAGE[keyword]
    jsonschema.validate(valid, schema, format_checker=FORMATS)
    for bad in invalids:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema, format_checker=FORMATS)
    g = grammar(smol_tok, schema=schema)
    assert g.matches(dumps(valid)), keyword
    for bad in invalids:
        assert not g.matches(dumps(bad)), (keyword, bad)


@pytest.mark.parametrize("schema, keyword, pointer", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems", "/uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not", "/properties/a/not"),
    ({"anyOf": [{"type": "integer"}, {"if": {"type": "string"}, "then": {"minLength": 2}}]}, "if", "/anyOf/1/if"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains", "/contains"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", "/dependentRequired"),
    ({"type": "object", "properties": {"x": {"type": "string", "format": "phone"}}}, "phone",
     "/properties/x/format"),
])
def test_unenforceable_keyword_is_refused_by_name(smol_tok, schema, keyword, pointer):
    with pytest.raises(InvalidRequestError) as e:
        grammar(smol_tok, schema=schema)
    assert e.value.field == "constraint.schema"
    assert repr(keyword) in str(e.value) and f"#{pointer} " in str(e.value)


@pytest.mark.parametrize("schema, pointer", [
    ({"type": "object", "properties": {"age": {"type": "integr"}}}, "/properties/age/type"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}, "/properties/a/minLength"),
    ({"type": "string", "pattern": "(["}, "/pattern"),
    ({"type": "object", "properties": [1]}, "/properties"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "/properties/a/$ref"),
    ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 5, "maximum": 1}}, "required": ["n"]},
     "/properties/n"),
    ({"type": "object", "properties": {"a": {"$ref": "http://example.com/s.json"}}}, "/properties/a"),
])
def test_invalid_schema_names_the_json_pointer(smol_tok, schema, pointer):
    with pytest.raises(InvalidRequestError) as e:
        grammar(smol_tok, schema=schema)
    assert e.value.field == "constraint.schema"
    assert f"(at #{pointer} of the schema)" in str(e.value), str(e.value)


@pytest.mark.parametrize("schema", [False, [1, 2], "string", {"type": "integer", "minimum": float("nan")}])
def test_unusable_schema_values_are_refused(smol_tok, schema):
    with pytest.raises(InvalidRequestError):
        grammar(smol_tok, schema=schema)


def test_deeply_nested_schema_is_refused(smol_tok):
    s: dict = {"type": "integer"}
    for _ in range(400):
        s = {"type": "array", "items": s}
    with pytest.raises(InvalidRequestError, match="nested|cannot be read"):
        grammar(smol_tok, schema=s)


# ------------------------------------------------------------------------------------ regex, Lark, GBNF
def test_regex_lark_and_gbnf(smol_tok):
    r = grammar(smol_tok, "regex", pattern=r"^(yes|no), [0-9]{2}$")
    assert r.matches("yes, 42") and not r.matches("yes, 4") and not r.matches("maybe, 42")
    lark = grammar(smol_tok, "grammar", grammar='start: "The answer is " NUM "."\nNUM: /[0-9]+/', syntax="lark")
    assert lark.matches("The answer is 42.") and not lark.matches("The answer is x.")
    gbnf = grammar(smol_tok, "grammar", syntax="gbnf",
                   grammar='root ::= answer " " num\nanswer ::= "yes" | "no"\nnum ::= [0-9]+')
    assert gbnf.matches("no 7") and not gbnf.matches("no seven")


@pytest.mark.parametrize("kind, kw, field", [
    ("regex", {"pattern": "[a-"}, "constraint.pattern"),
    ("regex", {"pattern": "(?=a)b"}, "constraint.pattern"),
    ("regex", {"pattern": 5}, "constraint.pattern"),
    ("grammar", {"grammar": "start: foo", "syntax": "lark"}, "constraint.grammar"),
    ("grammar", {"grammar": "root ::= foo", "syntax": "gbnf"}, "constraint.grammar"),
    ("grammar", {"grammar": "", "syntax": "lark"}, "constraint.grammar"),
    ("grammar", {"grammar": 'start: "x"', "syntax": "peg"}, "constraint.syntax"),
])
def test_bad_grammars_name_the_field(smol_tok, kind, kw, field):
    with pytest.raises(InvalidRequestError) as e:
        grammar(smol_tok, kind, **kw)
    assert e.value.field == field


def test_compile_is_bounded_and_cached(smol_tok, monkeypatch):
    # Too large: the text limit, checked before any work.
    monkeypatch.setattr(engine, "MAX_GRAMMAR_CHARS", 2000)
    with pytest.raises(InvalidRequestError, match="larger than the limit"):
        grammar(smol_tok, schema={"enum": [f"value-{i}" for i in range(500)]})
    monkeypatch.undo()
    # Too big for the engine's own limits: refused, not built.
    monkeypatch.setitem(engine.LIMITS, "initial_lexer_fuel", 20_000)
    engine.clear_cache()
    t0 = time.monotonic()
    with pytest.raises(InvalidRequestError, match="too large or complex"):
        grammar(smol_tok, schema={"enum": [f"value-{i}" for i in range(3000)]})
    assert time.monotonic() - t0 < 20
    monkeypatch.undo()
    # Too slow: refused at the deadline while the build finishes in the background; serving goes on.
    monkeypatch.setattr(engine, "COMPILE_SECONDS", 0.01)
    slow = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)},
            "required": [f"p{i}" for i in range(0, 3000, 2)]}
    with pytest.raises(InvalidRequestError, match="longer than"):
        grammar(smol_tok, schema=slow)
    monkeypatch.setattr(engine, "COMPILE_SECONDS", 60.0)
    assert grammar(smol_tok, "regex", pattern="ok").matches("ok")
    # Cached per (text, tokenizer), least recently used dropped first.
    engine.clear_cache()
    monkeypatch.setattr(engine, "CACHE_SIZE", 2)
    a = grammar(smol_tok, "regex", pattern="a+")
    assert grammar(smol_tok, "regex", pattern="a+") is a
    grammar(smol_tok, "regex", pattern="b+")
    grammar(smol_tok, "regex", pattern="c+")
    assert engine.cached_grammars() == 2 and grammar(smol_tok, "regex", pattern="a+") is not a


# ------------------------------------------------------------------------------------ the logits processor
def test_mask_matches_python_re_over_the_whole_vocabulary(smol_tok):
    """Allowed ids after each prefix == every token whose bytes keep the text a prefix of a match (by `re`)."""
    pattern = r"[0-9]{2,3}-x"
    g = grammar(smol_tok, "regex", pattern=pattern)
    stops = sorted(smol_tok.stop_ids)
    texts = [smol_tok.token_bytes(i).decode("utf-8", "replace") if not smol_tok.is_special(i) else None
             for i in range(smol_tok.vocab_size)]
    full = re.compile(pattern)

    def can_continue(s: str) -> bool:  # is s a prefix of some match of [0-9]{2,3}-x ?
        return bool(re.fullmatch(r"[0-9]{0,3}|[0-9]{2,3}-|[0-9]{2,3}-x", s))

    proc = GrammarLogitsProcessor(g, stops)
    history = [1, 2, 3]  # a "prompt"
    for step, token_text in enumerate(["1", "23", "-", "x"]):
        done = "".join(smol_tok.decode([t]) for t in history[3:])
        got = set(allowed_ids(proc, history, smol_tok.vocab_size))
        want = {i for i, t in enumerate(texts) if t and can_continue(done + t)}
        if full.fullmatch(done):
            want |= set(stops)
        assert got == want, (step, done, sorted(got ^ want)[:10])
        history = history + smol_tok.encode(token_text)
    done = "".join(smol_tok.decode([t]) for t in history[3:])
    assert done == "123-x" and set(allowed_ids(proc, history, smol_tok.vocab_size)) == set(stops)


def test_processor_masks_padded_ids_and_control_tokens(smol_tok):
    g = grammar(smol_tok, "regex", pattern=r"<\|im_end\|>")
    proc = GrammarLogitsProcessor(g, smol_tok.stop_ids)
    logits = proc([5], torch.zeros(smol_tok.vocab_size + 64))  # an embedding padded past the tokenizer
    allowed = torch.nonzero(torch.isfinite(logits))[:, 0].tolist()
    assert allowed and all(i < smol_tok.vocab_size and not smol_tok.is_special(i) for i in allowed)
    assert all(smol_tok.token_bytes(i).decode() and "<|im_end|>".startswith(smol_tok.token_bytes(i).decode())
               for i in allowed)


# ------------------------------------------------------------------------------------ through the seam
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer",
     "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
     "required": ["colour", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 3},
    {"anyOf": [{"type": "null"}, {"type": "string", "pattern": "^[a-z]{1,4}$"}]},
]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_random_model_output_always_validates(tiny, temperature):
    for schema in SCHEMAS:
        for seed in range(1 if temperature == 0 else 2):
            out = generate(tiny, "Answer:", json_schema=schema, max_tokens=48, temperature=temperature,
                           seed=seed, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.1)
            ok, complete = grammar(tiny.tokenizer, schema=schema).check(out.text)
            assert ok, (schema, out.text)
            if out.finish_reason == "stop":
                assert complete
                jsonschema.validate(json.loads(out.text), schema)
            else:
                assert out.finish_reason == "length" and not complete


def test_max_tokens_cut_is_length_and_stop_string_cut_is_not_stop(tiny):
    schema = SCHEMAS[0]
    out = generate(tiny, "x", json_schema=schema, max_tokens=3, temperature=0)
    assert out.finish_reason == "length" and not grammar(tiny.tokenizer, schema=schema).matches(out.text)
    out = generate(tiny, "x", json_schema=schema, max_tokens=40, temperature=0, stop=['"'])
    assert out.text.strip() == "{" and out.finish_reason == "length"


def test_chat_constraint_and_instruction(tiny):
    req = build_request(messages=[{"role": "user", "content": "hi"}], json_schema=SCHEMAS[1])
    plan = pipeline.plan(tiny, req)
    assert plan.messages[0]["role"] == "system" and '"colour"' in plan.messages[0]["content"]
    outs = [chat(tiny, [{"role": "user", "content": "hi"}], json_schema=SCHEMAS[1], max_tokens=40,
                 temperature=0.8, seed=seed) for seed in range(3)]
    assert any(o.finish_reason == "stop" for o in outs)
    for o in outs:
        if o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), SCHEMAS[1])
    out = chat(tiny, [{"role": "user", "content": "hi"}], json_mode=True, max_tokens=30, temperature=0)
    assert grammar(tiny.tokenizer, "json").check(out.text)[0]


def test_constraint_refuses_ignore_eos(tiny):
    with pytest.raises(InvalidRequestError) as e:
        generate(tiny, "x", regex="a+", ignore_eos=True, max_tokens=4)
    assert e.value.field == "ignore_eos"


def test_batched_rows_keep_their_own_grammar_state(tiny):
    """Four rows decoding together, two schemas, one grammar state each: every row validates on its own."""
    eng = BatchEngine(tiny, max_batch=4, max_seq_len=128)
    rows = []
    for i in range(4):
        schema = SCHEMAS[i % 2]
        p = pipeline.plan(tiny, build_request(prompt=f"row {i}:", json_schema=schema, max_tokens=40,
                                              temperature=0.9, seed=i, top_k=0, top_p=1.0, min_p=0.0),
                          context_length=128)
        out = p.output()
        rows.append((eng.add(p.prompt_ids, p.params, p.processors()), out, schema))
    texts = {id(r): "" for r, _, _ in rows}
    finished = {}
    while eng.has_work():
        for r, ev in eng.step():
            o = next(o for rr, o, _ in rows if rr is r)
            texts[id(r)] += "".join(d.text for d in o.feed(ev.text))
            if ev.finish_reason is not None:
                finished[id(r)] = o.finish(ev.finish_reason)[1]
    for r, _, schema in rows:
        res = finished[id(r)]
        if res.finish_reason == "stop":
            jsonschema.validate(json.loads(res.text), schema)
        else:
            assert grammar(tiny.tokenizer, schema=schema).check(res.text) == (True, False)
    assert sum(finished[id(r)].finish_reason == "stop" for r, _, _ in rows) >= 2


def test_prompt_request_with_grammar(tiny):
    out = generate(tiny, "Q:", grammar='start: "A: " ("yes" | "no")', max_tokens=10, temperature=0.7, seed=5)
    assert out.text in ("A: yes", "A: no") and out.finish_reason == "stop"
    out = generate(tiny, "Q:", grammar='root ::= [0-9] [0-9]', grammar_syntax="gbnf", max_tokens=10)
    assert re.fullmatch(r"[0-9]{2}", out.text) and out.finish_reason == "stop"
    with pytest.raises(InvalidRequestError) as e:
        generate(tiny, "Q:", json_schema={"type": "nope"}, max_tokens=4)
    assert e.value.field == "json_schema"
