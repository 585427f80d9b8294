"""The grammar of a model's tool calls (Lark for llguidance): each call is the chat format's opener, the JSON
object {fixed..., "name": NAME, ARGS_KEY: arguments valid under the tool's parameters schema}, and the closer.
Keys come in that order and only the offered tools' names are possible, so an enforced call always parses and
its arguments always validate.
"""
from __future__ import annotations

import json
from typing import Sequence

from ...tokenizer.tool_format import ToolSyntax
from ..constraints import schema as schemas
from ..request import Tool

_DEFS = ("$defs", "definitions")


def call_schema(tool: Tool, syntax: ToolSyntax) -> dict:
    """JSON Schema of one call of `tool` as the model writes it (the parameters' definitions hoisted to the
    root, so their "#/$defs/..." references still resolve)."""
    params = dict(tool.parameters or {"type": "object"})
    hoisted = {k: params.pop(k) for k in _DEFS if k in params}
    props: dict = {k: {"const": v} for k, v in syntax.fixed}
    props["name"] = {"const": tool.name}
    props[syntax.args_key] = params
    return dict({"x-guidance": schemas.CALL_JSON_OPTIONS, "type": "object", "properties": props,
                 "required": list(props), "additionalProperties": False}, **hoisted)


def calls_lark(tools: Sequence[Tool], syntax: ToolSyntax, *, parallel: bool, answer_schema=None) -> str:
    """Lark text for "one call (or several, when `parallel`) of these tools", or, when `answer_schema` is given,
    "calls, or else one JSON value valid under answer_schema"."""
    opener = syntax.opener if syntax.opener_is_control else None  # a control token: Lark names it as is
    lines = []
    for i, t in enumerate(tools):
        body = "%json" + json.dumps(call_schema(t, syntax), ensure_ascii=False)
        if not syntax.opener_is_control and syntax.opener:
            body = f"{_lit(syntax.opener)} {body}"
        if not syntax.opener_is_control and syntax.closer:
            body = f"{body} {_lit(syntax.closer)}"
        lines.append(f"call_{i}: {body}")
    one = " | ".join(f"call_{i}" for i in range(len(tools)))
    lines.append(f"call: {one}")
    sep = _lit(syntax.separator)
    seq = f"call ({sep} call)*" if parallel else "call"
    lines.append(f"calls: {opener + ' ' if opener else ''}{seq}")
    if answer_schema is not None:
        answer = dict(answer_schema) if isinstance(answer_schema, dict) else {}
        answer.setdefault("x-guidance", schemas.JSON_OPTIONS)
        lines.append("answer: %json" + json.dumps(answer, ensure_ascii=False))
        lines.insert(0, "start: calls | answer")
    else:
        lines.insert(0, "start: calls")
    return "\n".join(lines)


def _lit(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
