"""Tools in prompts: how each chat format lists tool definitions, writes a model's tool calls and returns tool
results, and `ToolSyntax`, the shape of a call as the model writes it (the seam's tools stage builds its grammar
and parser from it).

Layouts (facts of the model families' published formats; the wording of our own instructions is ours):
- Llama 3.1/3.2 (Meta's "JSON based tool calling"): the system turn starts with "Environment: ipython" and the
  knowledge/today dates, a user turn lists the functions as JSON before the conversation's first user message,
  the model answers `<|python_tag|>{"type": "function", "name": ..., "parameters": {...}}` and ends with
  `<|eom_id|>`; tool results come back in `ipython` turns.
- ChatML models (Hermes/Qwen style): the system prompt lists the functions inside <tools></tools>, the model
  answers `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (one block per call), results come back
  in a `tool` turn as <tool_response> blocks.
- Llama 2 has no tool format of its own: the ChatML/Hermes convention inside its system prompt and turns.
- A model's own Jinja template receives `tools` and the messages as transformers passes them (chat.py).
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any, Sequence
from .._fs import loads_json


@dataclass(frozen=True)
class ToolSyntax:
    """The shape of the model's tool calls.

    opener / closer: text around each call (`opener` is a control-token name when `opener_is_control`).
    separator: text between two calls of one turn. Each call is the JSON object {fixed..., "name": NAME,
    args_key: ARGUMENTS}. trigger: what marks the start of a call in free text; `start_only`: calls are
    recognised only at the very start of the answer.
    """

    name: str
    opener: str
    closer: str
    separator: str
    args_key: str
    fixed: tuple[tuple[str, str], ...] = ()
    opener_is_control: bool = False
    start_only: bool = False

    @property
    def trigger(self) -> str:
        """The text that starts a call ("<tool_call>" without its newline; '{"' for a bare JSON call)."""
        return self.opener.strip() if self.opener else '{"'

    def call_json(self, name: str, arguments: Any) -> str:
        obj = dict(self.fixed)
        obj["name"] = name
        obj[self.args_key] = arguments
        return json.dumps(obj, ensure_ascii=False)

    def calls_text(self, calls: Sequence[dict]) -> str:
        """The text of an assistant turn's calls (OpenAI-shaped `tool_calls`), as the model would write them: a
        text opener and the closer around every call; a control-token opener once, before the first."""
        jsons = [self.call_json(c["function"]["name"], arguments_of(c)) for c in calls]
        if self.opener_is_control:
            return self.opener + self.separator.join(jsons)
        return self.separator.join(self.opener + j + self.closer for j in jsons)


HERMES = ToolSyntax("hermes", "<tool_call>\n", "\n</tool_call>", "\n", "arguments")
LLAMA3_JSON = ToolSyntax("llama3_json", "<|python_tag|>", "", "; ", "parameters", fixed=(("type", "function"),),
                         opener_is_control=True)
# Meta's Hugging Face template for Llama 3.1/3.2: the whole answer is {"name": ..., "parameters": ...}.
LLAMA3_HF = ToolSyntax("llama3_hf", "", "", "; ", "parameters", start_only=True)


def arguments_of(call: dict) -> Any:
    """The arguments of an OpenAI-shaped tool call as a value (its JSON text parsed; non-JSON text kept)."""
    args = (call.get("function") or {}).get("arguments")
    if isinstance(args, str):
        try:
            return loads_json(args) if args.strip() else {}
        except ValueError:
            return args
    return {} if args is None else args


def tool_dicts(tools: Sequence[Any]) -> list[dict]:
    """Tools as OpenAI function tools ({"type": "function", "function": {name, description, parameters}})."""
    out = []
    for t in tools or ():
        if isinstance(t, dict):
            out.append(t if "function" in t else {"type": "function", "function": t})
        else:  # generate.request.Tool and the like
            out.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                         "parameters": t.parameters}})
    return out


def hermes_tools_block(tools: Sequence[dict]) -> str:
    """The system-prompt section that lists tools for a ChatML (or Llama 2) model."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tool_dicts(tools))
    return ("# Tools\n\nYou can call functions to help with the user's request. Their definitions are inside "
            f"<tools></tools>:\n<tools>\n{lines}\n</tools>\n\nTo call a function, reply with a JSON object "
            "holding its name and arguments inside <tool_call></tool_call> tags, one block per call:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')


def llama3_system(system: str | None, today: "str | _dt.date | None" = None) -> str:
    """Meta's system turn for tool use: Environment: ipython, the knowledge cut-off and today's date."""
    if today is None:
        today = _dt.date.today()
    if isinstance(today, _dt.date):
        today = today.strftime("%d %B %Y")
    text = f"Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: {today}\n"
    return text + (f"\n{system.strip()}\n" if system and system.strip() else "")


def llama3_tools_message(tools: Sequence[dict]) -> str:
    """Meta's user turn listing custom tools in JSON ("JSON based tool calling", Llama 3.1 prompt format)."""
    defs = "\n".join(json.dumps(t, indent=4, ensure_ascii=False) for t in tool_dicts(tools))
    return ("Answer the user's question by making use of the following functions if needed.\n"
            "If none of the function can be used, please say so.\n"
            f"Here is a list of functions in JSON format:\n{defs}\n\nReturn function calls in JSON format.")


def tool_response_block(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"
