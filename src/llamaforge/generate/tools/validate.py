"""Checks of a request's tools, tool_choice and tool messages (each failure names the caller's field)."""
from __future__ import annotations

import re

from ...errors import InvalidRequestError
from ..constraints import schema as schemas
from ..request import GenerationRequest, Tool
from ..._fs import loads_json

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # the rule OpenAI applies to function names
MAX_TOOLS = 128


def check_tools(req: GenerationRequest) -> list[Tool]:
    """The request's tools, validated: names, descriptions, parameters (an object JSON Schema)."""
    sp = req.spelling
    tools = req.tools
    if not isinstance(tools, (list, tuple)):
        raise InvalidRequestError("tools must be a list of function definitions", field=sp("tools"))
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"at most {MAX_TOOLS} tools are allowed", field=sp("tools"))
    seen: set[str] = set()
    for i, t in enumerate(tools):
        where = sp(f"tools[{i}]")
        if not isinstance(t, Tool):
            raise InvalidRequestError(f"{where} must be a function definition", field=where)
        if not isinstance(t.name, str) or not NAME.match(t.name):
            raise InvalidRequestError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got "
                                      f"{t.name!r}", field=f"{where}.function.name")
        if t.name in seen:
            raise InvalidRequestError(f"two tools are named {t.name!r}", field=f"{where}.function.name")
        seen.add(t.name)
        if not isinstance(t.description, str):
            raise InvalidRequestError(f"{where}.function.description must be a string",
                                      field=f"{where}.function.description")
        check_parameters(t.parameters, f"{where}.function.parameters")
    return list(tools)


def check_parameters(params, where: str) -> None:
    """A tool's parameters: a JSON Schema for an object (InvalidRequestError with the JSON pointer if not)."""
    if not isinstance(params, dict):
        raise InvalidRequestError(f"{where} must be a JSON Schema object", field=where)
    if params.get("type", "object") != "object":
        raise InvalidRequestError(f"{where} must describe an object (type 'object'), got type "
                                  f"{params.get('type')!r}", field=where)
    try:
        schemas.json_schema_source(params)
    except schemas.SchemaProblem as e:
        raise InvalidRequestError(f"{where}: {e.message} (at #{e.pointer})", field=where) from None


def check_tool_choice(req: GenerationRequest, names: set[str]) -> None:
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("name") not in names:
            known = ", ".join(sorted(names)) or "none"
            raise InvalidRequestError(f"tool_choice names the function {choice.get('name')!r}, which is not among "
                                      f"the tools ({known})", field=req.spelling("tool_choice"))
    elif choice == "required" and not names:
        raise InvalidRequestError("tool_choice 'required' needs tools", field=req.spelling("tool_choice"))


def check_tool_messages(req: GenerationRequest, messages: list[dict]) -> None:
    """Assistant tool calls are well formed; every tool message answers an earlier call by its id."""
    ids: set[str] = set()
    for i, m in enumerate(messages):
        where = req.spelling(f"messages[{i}]")
        calls = m.get("tool_calls")
        if m["role"] == "assistant" and calls:
            if not isinstance(calls, (list, tuple)):
                raise InvalidRequestError(f"{where}.tool_calls must be a list", field=f"{where}.tool_calls")
            for j, c in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise InvalidRequestError(f"{cw} must be {{'id', 'type': 'function', 'function': {{'name', "
                                              f"'arguments'}}}}", field=cw)
                args = fn.get("arguments", "{}")
                if isinstance(args, str):
                    try:
                        args = loads_json(args) if args.strip() else {}
                    except ValueError:
                        raise InvalidRequestError(f"{cw}.function.arguments is not valid JSON",
                                                  field=f"{cw}.function.arguments") from None
                if not isinstance(args, dict):
                    raise InvalidRequestError(f"{cw}.function.arguments must be a JSON object",
                                              field=f"{cw}.function.arguments")
                if c.get("id") is not None:
                    if not isinstance(c["id"], str):
                        raise InvalidRequestError(f"{cw}.id must be a string", field=f"{cw}.id")
                    ids.add(c["id"])
        elif calls:
            raise InvalidRequestError(f"only assistant messages carry tool_calls ({where} is "
                                      f"{m['role']!r})", field=f"{where}.tool_calls")
        if m["role"] == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or tid not in ids:
                what = "has no tool_call_id" if tid is None else f"answers the call id {tid!r}"
                raise InvalidRequestError(f"{where} {what}, which matches no earlier assistant tool call",
                                          field=f"{where}.tool_call_id")
