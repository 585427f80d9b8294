"""JSON Schema -> grammar: validation with JSON pointers, refusal of what cannot be enforced, llguidance source.

`json_schema_source(schema)` returns llguidance grammar source for "the output is one JSON value valid under
`schema`", or raises `SchemaProblem(message, pointer)`; `explain(schema, error)` turns llguidance's refusal of
that source (when it is built, under the engine's deadline) into a `SchemaProblem`:
- the schema is checked against its metaschema first (the `jsonschema` package; draft from `$schema`, else
  2020-12), so a malformed schema names the JSON pointer of its bad part;
- llguidance refuses keywords it cannot enforce ("uniqueItems", "not", "if", "contains", unknown formats, ...);
  the refusal is reported with the keyword and the pointer of the first subschema that uses it, never relaxed;
- anything else llguidance rejects (an unresolvable `$ref`, an unsatisfiable range) is located by probing the
  subschemas, deepest first.

Output layout: one JSON value in UTF-8 (escapes allowed, except the solidus one), no whitespace before or after it; between tokens at most two spaces/tabs or one
newline plus up to 24 spaces of indentation (`WHITESPACE`), so pretty-printed output is allowed and padding forever is not.
"""
from __future__ import annotations

import json
import re
import time
from typing import Any, Iterator

import llguidance

from .engine import LIMITS

WHITESPACE = r"(?:[ \t]{0,2}|\r?\n {0,24})"
# \uXXXX escapes of printable characters are valid JSON (llguidance allows them only where no regex applies);
# the escape "\/" is the one piece of JSON the engine cannot produce (json.dumps never writes it).
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE,
                "json_allow_general_unicode_escapes": True}
# Tool calls are written the way chat models learned them (json.dumps' separators, one line): short and stable.
CALL_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                     "json_allow_general_unicode_escapes": True}
ANY_OBJECT = {"type": "object"}
MAX_PROBES = 256      # subschemas compiled while locating an error ...
PROBE_SECONDS = 1.0   # ... and the time spent on it

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
                  "propertyNames", "unevaluatedProperties", "unevaluatedItems")


class SchemaProblem(Exception):
    """A schema that cannot be used: `message`, and `pointer` (JSON pointer, "" = the root) of the bad part."""

    def __init__(self, message: str, pointer: str = ""):
        self.message, self.pointer = message, pointer
        super().__init__(f"{message} (at #{pointer})")


def json_schema_source(schema: Any) -> str:
    """llguidance grammar source for one JSON value valid under `schema` (see the module docstring)."""
    if schema is True:
        schema = {}
    if schema is False:
        raise SchemaProblem("the schema `false` matches nothing")
    if not isinstance(schema, dict):
        raise SchemaProblem(f"a JSON Schema must be an object or a boolean, got {type(schema).__name__}")
    _check_metaschema(schema)
    try:
        return _source(schema)
    except ValueError as e:  # serde refuses the text (nesting over its recursion limit)
        raise SchemaProblem(f"the schema cannot be read: {e}") from None


def _source(schema: dict) -> str:
    try:
        text = json.dumps(schema, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        raise ValueError(str(e) or "not JSON") from None
    return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)


def engine_error(grammar: str) -> str:
    """llguidance's verdict on a grammar without building it for a vocabulary ("" when it is fine)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, None, limits=llguidance.LLParserLimits(**LIMITS))
    return messages[0] if is_error and messages else ""


def _check_metaschema(schema: dict) -> None:
    import jsonschema
    from jsonschema.exceptions import best_match
    from jsonschema.validators import validator_for
    try:
        cls = validator_for(schema, default=jsonschema.Draft202012Validator)
        error = best_match(cls(cls.META_SCHEMA, format_checker=cls.FORMAT_CHECKER).iter_errors(schema))
    except RecursionError:
        raise SchemaProblem("the schema is nested too deeply") from None
    except jsonschema.exceptions.SchemaError as e:  # an unknown $schema draft or the like
        raise SchemaProblem(f"invalid JSON Schema: {e.message}") from None
    if error is not None:
        raise SchemaProblem(f"invalid JSON Schema: {error.message}", _pointer(error.absolute_path))


def _pointer(parts) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def subschemas(schema: Any, pointer: str = "") -> Iterator[tuple[str, dict]]:
    """(pointer, subschema) for `schema` and every schema nested in it, in document order."""
    if not isinstance(schema, dict):
        return
    yield pointer, schema
    for key, value in schema.items():
        here = f"{pointer}/{_pointer([key])[1:]}"
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from subschemas(sub, f"{here}/{_pointer([name])[1:]}")
        elif key in _SCHEMA_LISTS and isinstance(value, list) or key == "items" and isinstance(value, list):
            for i, sub in enumerate(value):
                yield from subschemas(sub, f"{here}/{i}")
        elif key in _SCHEMA_VALUES:
            yield from subschemas(value, here)


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \[(.*?)\]')
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
_MISSING_POINTER = re.compile(r"Pointer '([^']*)' does not exist")
_RESOURCE = re.compile(r"too big|too complex|fuel|limit", re.I)


def explain(schema: Any, error: str) -> SchemaProblem:
    """A SchemaProblem for llguidance's refusal `error` of `schema`, with the pointer of the part responsible."""
    if not isinstance(schema, dict):
        return SchemaProblem(f"the schema cannot be enforced: {error.splitlines()[0]}")
    m = _UNIMPLEMENTED.search(error)
    if m:
        keys = [k.strip().strip('"') for k in m.group(1).split(",") if k.strip()]
        for ptr, sub in subschemas(schema):
            used = [k for k in keys if k in sub]
            if used:
                return SchemaProblem(f"the JSON Schema keyword {used[0]!r} is not supported: constrained decoding "
                                     f"cannot enforce it", f"{ptr}/{used[0]}")
        return SchemaProblem(f"the JSON Schema keyword {keys[0]!r} is not supported: constrained decoding cannot "
                             f"enforce it" if keys else error)
    m = _UNKNOWN_FORMAT.search(error)
    if m:
        fmt = m.group(1).strip("'\"")
        for ptr, sub in subschemas(schema):
            if sub.get("format") == fmt:
                return SchemaProblem(f"the string format {fmt!r} is not supported: constrained decoding cannot "
                                     f"enforce it", f"{ptr}/format")
    m = _MISSING_POINTER.search(error)
    if m:
        target = m.group(1)
        for ptr, sub in subschemas(schema):
            ref = sub.get("$ref")
            if isinstance(ref, str) and ref.split("#", 1)[-1] == target:
                return SchemaProblem(f"$ref {ref!r} points to nothing in the schema", f"{ptr}/$ref")
    first = error.splitlines()[0]
    if _RESOURCE.search(error):
        return SchemaProblem(f"the schema is too large or complex to enforce: {first}")
    return SchemaProblem(f"the schema cannot be enforced: {first}", _deepest_failing(schema))


def _deepest_failing(schema: dict) -> str:
    """Pointer of the innermost subschema llguidance rejects on its own (given the root's definitions); each
    probe is a small grammar, and probing stops after MAX_PROBES subschemas or PROBE_SECONDS."""
    defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
    failing: list[str] = []
    deadline = time.monotonic() + PROBE_SECONDS
    for n, (ptr, sub) in enumerate(subschemas(schema)):
        if n >= MAX_PROBES or time.monotonic() > deadline:
            break
        if not ptr:
            continue
        try:
            failed = bool(engine_error(_source(dict(defs, **sub))))
        except ValueError:
            failed = True
        if failed:
            failing.append(ptr)
    # Document order puts a parent before its children: the first failing one with no failing descendant.
    return next((p for p in failing if not any(q.startswith(p + "/") for q in failing)), "")
