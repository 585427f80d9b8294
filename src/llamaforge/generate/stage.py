"""The stage protocol of the request seam (`generate.pipeline`): what a feature implements to act on every request.

- `Stage.prepare(ctx)` runs before the prompt is encoded: edit `ctx.messages`, add `ctx.citations`, pass extra
  arguments to the chat format (`ctx.format_kwargs`, e.g. tools), refuse the request (`ctx.refuse(...)`: the model
  does not run), or raise `InvalidRequestError` naming a field (`ctx.error(...)`).
- `Stage.processors(plan)` returns fresh logits processors for one choice (each row keeps its own state).
- `Stage.output(plan)` returns a fresh `OutputFilter` for one choice: it sees text deltas as they stream, may hold
  text back or turn it into structured deltas (tool calls), and shapes the final `Result`.
- `Stage.provides` names the request features it implements (see `pipeline._FEATURES`); a request using a feature
  no active stage provides is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import InvalidRequestError
from .request import GenerationRequest
from .sampling import LogitsProcessor

if TYPE_CHECKING:
    from .pipeline import Plan


# --------------------------------------------------------------------------------------------- output side
@dataclass
class Delta:
    """A piece of one choice's output: text, and/or tool-call fragments shaped as OpenAI streams them
    ({"index", "id", "type", "function": {"name", "arguments"}}, each field present only when it starts)."""

    text: str = ""
    tool_calls: list[dict] | None = None


@dataclass
class Result:
    """One choice's final output. `finish_reason`: "stop", "length", "tool_calls", "content_filter" (or the
    engine's own). `extra` holds stage findings the front end may show (guard verdicts, code findings)."""

    text: str = ""
    finish_reason: str | None = None
    tool_calls: list[dict] = field(default_factory=list)
    citations: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class OutputFilter:
    """Post-processing of one choice. The default passes everything through unchanged."""

    def feed(self, deltas: list[Delta]) -> list[Delta]:
        return deltas

    def finish(self, result: Result) -> list[Delta]:
        """Generation ended: release held text (as deltas) and shape `result` (text, finish_reason, ...)."""
        return []


class Output:
    """The stages' filters for one choice, run in order. `feed(text)` -> deltas to send now; `finish(reason)` ->
    (last deltas, Result). `result.text` is what the deltas' text joins to."""

    def __init__(self, filters: Sequence[OutputFilter], citations: list[dict]):
        self.filters = list(filters)
        self.result = Result(citations=list(citations))
        self._parts: list[str] = []

    def feed(self, text: str) -> list[Delta]:
        deltas = [Delta(text)] if text else []
        for f in self.filters:
            if not deltas:
                break
            deltas = f.feed(deltas)
        return self._note(deltas)

    @property
    def stopped(self) -> bool:
        """A filter withholds the rest of the answer (an output guard blocked it): generating more is wasted."""
        return any(getattr(f, "stop", False) for f in self.filters)

    def finish(self, finish_reason: str | None) -> tuple[list[Delta], Result]:
        self.result.finish_reason = finish_reason
        tail: list[Delta] = []
        for f in self.filters:
            tail = f.feed(tail) if tail else []
            tail += f.finish(self.result)
        self._note(tail)
        self.result.text = "".join(self._parts)
        return tail, self.result

    def _note(self, deltas: list[Delta]) -> list[Delta]:
        for d in deltas:
            if d.text:
                self._parts.append(d.text)
        return deltas


# --------------------------------------------------------------------------------------------- stages
@dataclass
class Refusal:
    """A stage decided the model must not run (an input guard): the answer is `text`, finish_reason `reason`."""

    text: str
    reason: str = "content_filter"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanContext:
    """What stages see and may change while a plan is being built."""

    lm: Any
    request: GenerationRequest
    messages: list[dict] | None
    citations: list[dict] = field(default_factory=list)
    refusal: Refusal | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # stage facts passed on to Plan.extra
    format_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments for ChatFormat.encode

    def refuse(self, text: str, reason: str = "content_filter", **extra) -> None:
        self.refusal = Refusal(text, reason, extra)

    def error(self, message: str, name: str) -> InvalidRequestError:
        """An InvalidRequestError naming the caller's spelling of the neutral field `name`."""
        return InvalidRequestError(message, field=self.request.spelling(name))


class Stage:
    """A feature of the seam. Subclasses override what they need; `applies` keeps a stage out of requests that
    do not use it."""

    name = "stage"
    provides: tuple[str, ...] = ()

    def applies(self, request: GenerationRequest) -> bool:
        return True

    def prepare(self, ctx: PlanContext) -> None:
        pass

    def processors(self, plan: "Plan") -> list[LogitsProcessor]:
        return []

    def output(self, plan: "Plan") -> OutputFilter | None:
        return None
