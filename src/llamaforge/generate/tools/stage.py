"""The tools stage of the seam: function tools, tool_choice and parallel_tool_calls for every front end.

prepare: validate the tools, tool_choice and the conversation's tool turns (400s naming the field), list the tools
in the prompt through the chat format (`ChatFormat.encode(tools=...)`), compile the call grammar of the format's
`tool_syntax`. processors / output: per choice, a `CallProcessor` or `OpenerBan` and a `ToolCallFilter`, paired
through a `Channel` (see processor.py).

tool_choice: "required" / {"name": ...}: the answer is calls (of that function), enforced by the grammar.
"auto": the model chooses; a call it opens is completed under the grammar and returned as tool_calls, never as
text. "none": tools are not offered and the opener cannot be produced. parallel_tool_calls false: one call.
With a response format (JSON / JSON Schema) and "auto", the answer is either calls or JSON valid under it.
"""
from __future__ import annotations

from collections import deque

from ...errors import InvalidRequestError
from ...tokenizer.tool_format import tool_dicts
from ..constraints import engine, schema as schemas
from ..constraints.stage import stop_ids
from ..stage import OutputFilter, PlanContext, Stage
from .grammar import call_schema, calls_lark
from .output import ToolCallFilter
from .processor import CallProcessor, Channel, OpenerBan
from .validate import check_tool_choice, check_tool_messages, check_tools


class _Pairs:
    """Pairs each choice's processor with its output filter, whichever of the two a front end asks for first
    (both are asked for once per choice, in choice order)."""

    def __init__(self):
        self.waiting = {"processor": deque(), "filter": deque()}

    def take(self, side: str) -> Channel:
        other = "filter" if side == "processor" else "processor"
        if self.waiting[other]:
            return self.waiting[other].popleft()
        ch = Channel()
        self.waiting[side].append(ch)
        return ch


class ToolStage(Stage):
    name = "tools"
    provides = ("tools",)

    def applies(self, request) -> bool:
        return bool(request.tools) or request.tool_choice not in ("auto", "none") or any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                          for m in request.messages or ())

    def prepare(self, ctx: PlanContext) -> None:
        req = ctx.request
        tools = check_tools(req) if req.tools else []
        check_tool_choice(req, {t.name for t in tools})
        if ctx.messages is None:
            if tools:
                raise ctx.error("tools need a conversation (messages), not a raw prompt", "tools")
            return
        check_tool_messages(req, ctx.messages)
        if not tools:
            return
        from ..chat_formats import chat_format
        syntax = chat_format(ctx.lm).tool_syntax
        choice = req.tool_choice
        mode = "off" if choice == "none" else "forced" if choice == "required" or isinstance(choice, dict) \
            else "auto"
        if mode == "off":
            ctx.extra["tools"] = (None, syntax, mode)
            return
        ctx.format_kwargs["tools"] = tool_dicts(tools)
        offered = [t for t in tools if not isinstance(choice, dict) or t.name == choice["name"]]
        answer = None
        c = req.constraint
        if c is not None:
            if c.kind not in ("json", "json_schema"):
                raise ctx.error(f"a {c.kind} constraint cannot be combined with tools (the answer may be a call)",
                                "constraint")
            ctx.extra["constraint_in_tools"] = True  # the call grammar below carries the response format
            if mode == "auto":
                answer = schemas.ANY_OBJECT if c.kind == "json" else c.schema
        lark = calls_lark(offered, syntax, parallel=bool(req.parallel_tool_calls), answer_schema=answer)
        try:
            grammar = engine.compile_grammar(ctx.lm.tokenizer, "tool-call grammar", engine.lark_grammar(lark))
        except engine.GrammarError as e:
            raise _locate_tool_error(req, offered, syntax, str(e)) from None
        ctx.extra["tools"] = (grammar, syntax, mode)
        ctx.extra["tool_pairs"] = _Pairs()

    def processors(self, plan) -> list:
        grammar, syntax, mode = plan.extra.get("tools") or (None, None, None)
        if syntax is None:
            return []
        tok = plan.lm.tokenizer
        if mode == "off":
            return [OpenerBan(tok, syntax)]
        channel = plan.extra["tool_pairs"].take("processor")
        forced = mode == "forced" or plan.extra.get("constraint_in_tools", False)
        return [CallProcessor(grammar, syntax, tok, stop_ids(plan), channel, forced=forced)]

    def output(self, plan) -> OutputFilter | None:
        grammar, syntax, mode = plan.extra.get("tools") or (None, None, None)
        if syntax is None:
            return None
        channel = plan.extra["tool_pairs"].take("filter") if mode != "off" else None
        return ToolCallFilter(syntax, mode, channel)


def _locate_tool_error(req, tools, syntax, error: str) -> InvalidRequestError:
    """Which tool's parameters the engine refused, with the JSON pointer inside them."""
    for i, t in enumerate(req.tools):
        if t not in tools:
            continue
        err = schemas.engine_error(schemas.json_schema_source(call_schema(t, syntax)))
        if err:
            p = schemas.explain(t.parameters, err)
            where = req.spelling(f"tools[{i}]") + ".function.parameters"
            return InvalidRequestError(f"{where}: {p.message} (at #{p.pointer})", field=where)
    return InvalidRequestError(f"the tools cannot be enforced: {error.splitlines()[0]}", field=req.spelling("tools"))
