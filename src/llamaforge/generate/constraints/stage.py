"""The constraint stage of the seam: `GenerationRequest.constraint` of kind "json" (one JSON object), "json_schema",
"regex" or "grammar" (Lark or GBNF) compiled against the model's vocabulary and enforced token by token.

prepare: compile (cached) and refuse a bad constraint with InvalidRequestError naming the caller's field; for the
JSON kinds, tell the model in the system prompt what to produce (the grammar guarantees the shape, the
instruction gives the model the chance to fill it with sense). processors: one `GrammarLogitsProcessor` per
choice. output: `ConstraintCheck`, which re-checks the finished text: a "stop" whose text is not a complete match
(a stop string cut it, the matcher hit a limit) is reported as "length", never as a silently invalid "stop".
"""
from __future__ import annotations

import json

from ...errors import InvalidRequestError
from ..stage import OutputFilter, PlanContext, Stage
from . import engine, schema as schemas
from .processor import GrammarLogitsProcessor

JSON_INSTRUCTION = "Respond only with a single valid JSON object. Do not write anything before or after it."
SCHEMA_INSTRUCTION = ("Respond only with JSON that matches this JSON Schema. Do not write anything before or after "
                      "it.\n{schema}")
MAX_INSTRUCTION_SCHEMA_CHARS = 8000  # a longer schema is enforced but not repeated to the model in full
GRAMMAR_SYNTAXES = ("lark", "gbnf")


def constraint_grammar(tok, constraint, spelling=lambda name: name) -> engine.Grammar:
    """Compile `constraint` (a request.Constraint) for tokenizer `tok`; InvalidRequestError naming the field
    (`spelling` maps neutral names such as "constraint.schema" to the caller's)."""
    kind = constraint.kind
    if tok is None:
        raise InvalidRequestError("constrained output needs a model with a tokenizer", field=spelling("constraint"))
    try:
        if kind in ("json", "json_schema"):
            where = spelling("constraint.schema") if kind == "json_schema" else spelling("constraint")
            schema = constraint.schema if kind == "json_schema" else schemas.ANY_OBJECT
            if kind == "json_schema" and schema is None:
                raise InvalidRequestError("a json_schema constraint needs a schema", field=where)
            try:
                source = schemas.json_schema_source(schema)
                return engine.compile_grammar(tok, "JSON schema", source, text=_dump(schema))
            except engine.GrammarError as e:
                raise _schema_error(schemas.explain(schema, str(e)), where) from None
            except schemas.SchemaProblem as e:
                raise _schema_error(e, where) from None
        if kind == "regex":
            where = spelling("constraint.pattern")
            if not isinstance(constraint.pattern, str):
                raise InvalidRequestError("the regex must be a string", field=where)
            try:
                return engine.compile_grammar(tok, "regex", engine.regex_grammar(constraint.pattern),
                                              text=constraint.pattern)
            except engine.GrammarError as e:
                raise InvalidRequestError(f"invalid regular expression: {_first_lines(e)}", field=where) from None
        if kind == "grammar":
            where = spelling("constraint.grammar")
            syntax = (constraint.syntax or "lark").lower()
            if syntax not in GRAMMAR_SYNTAXES:
                raise InvalidRequestError(f"unknown grammar syntax {constraint.syntax!r}; expected one of "
                                          f"{', '.join(GRAMMAR_SYNTAXES)}", field=spelling("constraint.syntax"))
            text = constraint.grammar
            if not isinstance(text, str) or not text.strip():
                raise InvalidRequestError("the grammar must be a non-empty string", field=where)
            if len(text) > engine.MAX_GRAMMAR_CHARS:
                raise InvalidRequestError(f"the grammar is larger than the limit of {engine.MAX_GRAMMAR_CHARS} "
                                          f"characters", field=where)
            try:
                lark = engine.gbnf_to_lark(text) if syntax == "gbnf" else text
                return engine.compile_grammar(tok, f"{syntax} grammar", engine.lark_grammar(lark), text=text)
            except (engine.GrammarError, ValueError) as e:
                raise InvalidRequestError(f"invalid {syntax.upper() if syntax == 'gbnf' else 'Lark'} grammar: "
                                          f"{_first_lines(e)}", field=where) from None
    except InvalidRequestError as e:
        if e.field == "constraint":  # the engine's own limits name the neutral field
            raise InvalidRequestError(str(e), field=spelling("constraint")) from None
        raise
    raise InvalidRequestError(f"unknown constraint {kind!r}", field=spelling("constraint"))


def _schema_error(problem: schemas.SchemaProblem, where: str) -> InvalidRequestError:
    return InvalidRequestError(f"{problem.message} (at #{problem.pointer} of the schema)", field=where)


def _first_lines(e: Exception, n: int = 6) -> str:
    return "\n".join(str(e).strip().splitlines()[:n])


def _dump(schema) -> str:
    return json.dumps(schema, sort_keys=True, ensure_ascii=False)


def stop_ids(plan) -> set[int]:
    """Every id that ends this plan's generation: the request's and format's stop ids, the tokenizer's ends."""
    tok = plan.lm.tokenizer
    return set(plan.params.stop_ids) | set(getattr(tok, "stop_ids", ()) or ())


class ConstraintCheck(OutputFilter):
    """Passes text through; at the end, a "stop" whose text is not a complete match becomes "length"."""

    def __init__(self, grammar: engine.Grammar):
        self.grammar = grammar
        self._parts: list[str] = []

    def feed(self, deltas):
        self._parts += [d.text for d in deltas if d.text]
        return deltas

    def finish(self, result):
        if result.tool_calls:
            return []  # the answer is calls (the tools stage checked them)
        if result.finish_reason == "stop" and not self.grammar.matches("".join(self._parts)):
            result.finish_reason = "length"
            result.extra["constraint"] = "the output ended before it matched the constraint"
        return []


class ConstraintStage(Stage):
    """Structured output: JSON object, JSON Schema, regex, Lark/GBNF grammar (see the module docstring)."""

    name = "constraints"
    provides = ("json", "json_schema", "regex", "grammar")

    def applies(self, request) -> bool:
        return request.constraint is not None

    def prepare(self, ctx: PlanContext) -> None:
        req = ctx.request
        if req.options.get("ignore_eos"):
            raise ctx.error("ignore_eos cannot be combined with constrained output (the grammar decides where the "
                            "output ends)", "ignore_eos")
        grammar = constraint_grammar(ctx.lm.tokenizer, req.constraint, req.spelling)
        ctx.extra["constraint_grammar"] = grammar
        if ctx.messages is not None and req.constraint.kind in ("json", "json_schema"):
            _instruct(ctx.messages, _instruction(req.constraint))

    def processors(self, plan) -> list:
        if plan.extra.get("constraint_in_tools"):
            return []  # the tools stage's call grammar carries the response format
        return [GrammarLogitsProcessor(plan.extra["constraint_grammar"], stop_ids(plan))]

    def output(self, plan) -> OutputFilter:
        return ConstraintCheck(plan.extra["constraint_grammar"])


def _instruction(constraint) -> str:
    if constraint.kind != "json_schema":
        return JSON_INSTRUCTION
    text = json.dumps(constraint.schema, ensure_ascii=False)
    if len(text) > MAX_INSTRUCTION_SCHEMA_CHARS:
        return JSON_INSTRUCTION
    return SCHEMA_INSTRUCTION.format(schema=text)


def _instruct(messages: list[dict], instruction: str) -> None:
    """Append `instruction` to the system message (adding one at the front when there is none)."""
    if messages and messages[0]["role"] == "system":
        messages[0] = dict(messages[0], content=messages[0]["content"].rstrip() + "\n\n" + instruction)
    else:
        messages.insert(0, {"role": "system", "content": instruction})

