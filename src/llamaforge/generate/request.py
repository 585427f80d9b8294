"""The dialect-neutral generation request: what every front end (Python API, CLI, OpenAI and Ollama routes, web UI)
builds from its own input before `generate.pipeline.plan` turns it into token ids, sampling and post-processing.

Front ends translate; they do not validate ranges or build prompts. A field a front end cannot map here is
refused by that front end with a 400 naming it; a field that maps here but that no stage implements is refused by
the seam (`pipeline.plan`) naming the front end's own spelling of it (`GenerationRequest.fields`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

CONSTRAINT_KINDS = ("json", "json_schema", "regex", "grammar")
TOOL_CHOICES = ("auto", "none", "required")


@dataclass
class Constraint:
    """The output must match: "json" (one JSON object), "json_schema" (`schema`; `strict` as OpenAI's flag),
    "regex" (`pattern`) or "grammar" (`grammar` text in `syntax` "lark" or "gbnf")."""

    kind: str
    schema: dict | None = None
    strict: bool = False
    pattern: str | None = None
    grammar: str | None = None
    syntax: str | None = None
    name: str | None = None          # OpenAI json_schema.name


@dataclass
class Tool:
    """A function the model may call: name, description and a JSON Schema for its arguments."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass
class Retrieval:
    """Ground the answer in a RAG collection: the `k` best passages for the last user message."""

    collection: str
    k: int = 5


@dataclass
class Guards:
    """Safety checks: classify the input before the model runs, the output while it streams, code in answers."""

    input: bool = False
    output: bool = False
    code: bool = False
    model: str | None = None


@dataclass
class GenerationRequest:
    """One request, whichever door it came in by. Exactly one of `messages` (chat) and `prompt` (raw text or
    token ids, no chat format) is set.

    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str, optional "tool_calls",
        "tool_call_id", "name"}].
    context: token ids of an earlier exchange placed before the prompt (Ollama's `context`).
    options: sampling values the caller set explicitly, by `SamplingParams` field name; None means unset.
        max_tokens None (after every layer) means "as many as the context holds".
    defaults: the front end's own defaults (Ollama's temperature 0.8, `run`'s repeat penalty), applied under the
        model's stored options, which are applied under `options`.
    limits: the front end's documented ranges for sampling fields, narrower than the engine's (OpenAI:
        temperature in [0, 2]): {field: (low, high)}, checked with the rest of the validation.
    fields: neutral field name -> the front end's spelling ("max_tokens" -> "options.num_predict"), so errors
        name what the caller typed.
    """

    messages: list[dict] | None = None
    prompt: str | Sequence[int] | None = None
    context: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    constraint: Constraint | None = None
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str | dict = "auto"     # "auto" | "none" | "required" | {"name": NAME}
    parallel_tool_calls: bool = True
    retrieval: Retrieval | None = None
    guards: Guards | None = None
    n: int = 1
    stream: bool = False
    limits: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)

    def spelling(self, name: str | None) -> str | None:
        """How the caller spells the neutral field `name` (itself when the front end did not say)."""
        if name is None or name in self.fields:
            return self.fields.get(name, name) if name is not None else None
        head = re.match(r"[A-Za-z_]+", name)
        if head and head.group(0) in self.fields:
            return self.fields[head.group(0)] + name[head.end():]
        return name
