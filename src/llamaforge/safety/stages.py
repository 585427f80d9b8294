"""The guards as stages of the request seam (`generate.stage`), registered from `llamaforge.api`.

- `GuardInputStage` ("guard_input"): classifies the conversation's last user turn before the model runs; an
  unsafe one is refused with a short answer naming the categories and finish_reason "content_filter".
- `InjectionStage` (part of "guard_input"): screens text that entered the prompt from outside - tool results and
  retrieved passages - and marks or drops flagged passages (`Guards.injection`: "mark" default, or "drop"),
  recording each decision; it runs after the retrieval stage.
- `GuardOutputStage` ("guard_output"): holds the streamed answer back in windows of `OUTPUT_WINDOW_CHARS`
  characters, checks the answer so far in the agent role, releases the window when safe; an unsafe window ends
  the answer (the rest is withheld, finish_reason "content_filter").
- `CodeShieldStage` ("code_shield"): text outside code fences streams as it comes, each fenced block is held until
  it closes and scanned: "block" findings replace it with a notice (finish_reason "content_filter"), "warn"
  findings release it with a warning note after it.

Verdicts go to `Result.extra["guard"]` ({"input", "output", "code", "injection"}).
"""
from __future__ import annotations

import re

from ..errors import LlamaforgeError
from ..generate.stage import Delta, OutputFilter, PlanContext, Result, Stage
from . import stats
from .categories import category_name
from .code_scan import extract_code_blocks, scan_code
from .guards import load_guard
from .injection import InjectionFilter

OUTPUT_WINDOW_CHARS = 256


def _guard(ctx_or_request, model):
    try:
        return load_guard(model)
    except LlamaforgeError as e:
        req = getattr(ctx_or_request, "request", ctx_or_request)
        from ..errors import InvalidRequestError
        raise InvalidRequestError(f"the guard model cannot be used: {e}", field=req.spelling("guards")) from None


def _names(codes) -> str:
    return ", ".join(f"{c} ({category_name(c)})" for c in codes) or "unsafe content"


def _extra(result_or_ctx) -> dict:
    return result_or_ctx.extra.setdefault("guard", {})


def _prompt_text(ctx: PlanContext) -> str:
    p = ctx.request.prompt
    if isinstance(p, str):
        return p
    tok = getattr(ctx.lm, "tokenizer", None)
    return tok.decode(list(p)) if tok is not None else ""


# --------------------------------------------------------------------------------------------- input
class GuardInputStage(Stage):
    name = "guard_input"
    provides = ("guard_input",)

    def applies(self, request) -> bool:
        return request.guards is not None and request.guards.input

    def prepare(self, ctx: PlanContext) -> None:
        guard = _guard(ctx, ctx.request.guards.model)
        content = ctx.messages if ctx.messages is not None else _prompt_text(ctx)
        if isinstance(content, list) and not any(m.get("role") == "user" for m in content):
            return
        if isinstance(content, list) and content and content[-1].get("role") not in ("user",):
            # A conversation ending with a tool result or assistant turn: judge the last user turn.
            last_user = max(i for i, m in enumerate(content) if m.get("role") == "user")
            content = content[:last_user + 1]
        verdict = guard.check(content, role="user")
        _extra(ctx)["input"] = verdict.to_dict()
        for c in verdict.categories or [""]:
            stats.record("input", "safe" if verdict.safe else "unsafe", c)
        if not verdict.safe:
            ctx.refuse(f"I can't help with that. The request was flagged as unsafe: {_names(verdict.categories)}.",
                       "content_filter", guard={"input": verdict.to_dict()})

    def output(self, plan) -> OutputFilter | None:
        return _ExtraFilter(plan.extra.get("guard", {}))


class _ExtraFilter(OutputFilter):
    """Copies the plan-time verdicts (input, injection) into the result."""

    def __init__(self, verdicts: dict):
        self.verdicts = verdicts

    def finish(self, result: Result) -> list[Delta]:
        for k, v in self.verdicts.items():
            _extra(result).setdefault(k, v)
        return []


class InjectionStage(Stage):
    """Runs after retrieval: tool results and retrieved passages are screened for prompt injection."""

    name = "injection_filter"
    provides = ("guard_input",)

    def __init__(self, detector: InjectionFilter | None = None):
        self.detector = detector or InjectionFilter()

    def applies(self, request) -> bool:
        return request.guards is not None and request.guards.input

    def prepare(self, ctx: PlanContext) -> None:
        policy = getattr(ctx.request.guards, "injection", None) or "mark"
        if policy not in ("mark", "drop", "off"):
            raise ctx.error(f"guards.injection must be 'mark', 'drop' or 'off', got {policy!r}", "guards")
        if policy == "off" or ctx.messages is None:
            return
        report = []
        for i, m in enumerate(ctx.messages):
            if m.get("role") != "tool" or not m.get("content"):
                continue
            r = self.detector.check(m["content"])
            if r.flagged:
                m["content"] = self.detector.apply(m["content"], r, policy, source="tool result")
                report.append({"source": "tool", "message": i, "score": round(r.score, 4), "reasons": r.reasons,
                               "action": "dropped" if policy == "drop" else "marked"})
        for c in ctx.citations:
            text = c.get("text")
            if not isinstance(text, str) or not text:
                continue
            r = self.detector.check(text)
            if not r.flagged:
                continue
            replacement = self.detector.apply(text, r, policy, source="retrieved passage")
            for m in ctx.messages:
                if isinstance(m.get("content"), str) and text in m["content"]:
                    m["content"] = m["content"].replace(text, replacement)
            c["injection"] = {"score": round(r.score, 4), "reasons": r.reasons,
                              "action": "dropped" if policy == "drop" else "marked"}
            if policy == "drop":
                c["text"] = replacement
            report.append({"source": "retrieval", "citation": c.get("n"), "score": round(r.score, 4),
                           "reasons": r.reasons, "action": "dropped" if policy == "drop" else "marked"})
        for item in report:
            stats.record("injection", item["action"], item["source"])
        if report:
            _extra(ctx).setdefault("injection", []).extend(report)


# --------------------------------------------------------------------------------------------- output
class GuardOutputStage(Stage):
    name = "guard_output"
    provides = ("guard_output",)

    def __init__(self, window_chars: int = OUTPUT_WINDOW_CHARS):
        self.window_chars = window_chars

    def applies(self, request) -> bool:
        return request.guards is not None and request.guards.output

    def prepare(self, ctx: PlanContext) -> None:
        _guard(ctx, ctx.request.guards.model)  # load (and validate) before the model runs

    def output(self, plan) -> OutputFilter:
        guard = load_guard(plan.request.guards.model)
        if plan.messages is not None:
            users = [m for m in plan.messages if m.get("role") == "user"]
            context = [{"role": "user", "content": users[-1]["content"]}] if users else []
        else:
            context = [{"role": "user", "content": plan.request.prompt if isinstance(plan.request.prompt, str)
                        else ""}]
        return _OutputGuard(guard, context, self.window_chars)


class _OutputGuard(OutputFilter):
    """Holds text back until the answer so far has been checked; stops releasing at the first unsafe window."""

    def __init__(self, guard, context: list[dict], window_chars: int):
        self.guard, self.context, self.window = guard, context, window_chars
        self.released = ""
        self.pending = ""
        self.pending_tools: list[Delta] = []
        self.verdict = None
        self.stop = False      # True once blocked: the caller may stop generating

    def _check(self, text: str):
        msgs = self.context + [{"role": "assistant", "content": text}]
        return self.guard.check(msgs, role="agent")

    def feed(self, deltas: list[Delta]) -> list[Delta]:
        if self.stop:
            return []
        for d in deltas:
            self.pending += d.text
            if d.tool_calls:
                self.pending_tools.append(Delta("", d.tool_calls))
        if len(self.pending) < self.window:
            return []
        return self._release_or_block()

    def _release_or_block(self) -> list[Delta]:
        v = self._check(self.released + self.pending)
        self.verdict = v
        if not v.safe:
            self.stop = True
            self.pending, self.pending_tools = "", []
            return []
        out = [Delta(self.pending)] if self.pending else []
        out += self.pending_tools
        self.released += self.pending
        self.pending, self.pending_tools = "", []
        return out

    def finish(self, result: Result) -> list[Delta]:
        tail: list[Delta] = []
        if not self.stop and (self.pending or self.pending_tools or self.verdict is None):
            if self.pending or self.released:
                tail = self._release_or_block()
        v = self.verdict
        if v is not None:
            _extra(result)["output"] = v.to_dict()
            for c in v.categories or [""]:
                stats.record("output", "safe" if v.safe else "unsafe", c)
        if self.stop:
            result.finish_reason = "content_filter"
            result.tool_calls = []
            tail.append(Delta(("\n\n" if self.released else "") +
                              f"[The rest of this answer was withheld: it was flagged as unsafe: "
                              f"{_names(v.categories)}.]"))
        return tail


# --------------------------------------------------------------------------------------------- code
_FENCE_OPEN = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})[ \t]*([^\n`]*)$")


class CodeShieldStage(Stage):
    name = "code_shield"
    provides = ("code_shield",)

    def applies(self, request) -> bool:
        return request.guards is not None and request.guards.code

    def output(self, plan) -> OutputFilter:
        return _CodeShield()


class _CodeShield(OutputFilter):
    """Streams text outside code fences; holds each fenced block until it closes, then scans it."""

    def __init__(self):
        self.line = ""             # the current partial line
        self.block: list[str] | None = None
        self.fence = ""
        self.tag = ""
        self.lines_out = 0         # answer lines released so far (for finding line numbers)
        self.block_start = 0
        self.findings: list[dict] = []
        self.blocked = 0
        self.warned = 0
        self.scanned = 0
        self.notes: list[str] = []

    def feed(self, deltas: list[Delta]) -> list[Delta]:
        out: list[Delta] = []
        text = "".join(d.text for d in deltas)
        tools = [d for d in deltas if d.tool_calls]
        if text:
            out += self._text(text)
        return out + [Delta("", d.tool_calls) for d in tools]

    def _text(self, text: str) -> list[Delta]:
        emitted: list[str] = []
        self.line += text
        while "\n" in self.line:
            line, self.line = self.line.split("\n", 1)
            emitted.append(self._line(line + "\n"))
        # A partial line outside a block streams unless it may become a fence opener.
        if self.block is None and self.line and not re.match(r"^[ \t]{0,3}([`~]|$)", self.line):
            emitted.append(self.line)
            self.line = ""
        s = "".join(emitted)
        return [Delta(s)] if s else []

    def _line(self, line: str) -> str:
        bare = line.rstrip("\n")
        if self.block is None:
            m = _FENCE_OPEN.match(bare)
            if m:
                self.block, self.fence, self.tag = [line], m.group(1), m.group(2).strip()
                self.block_start = self.lines_out + 1
                return ""
            self.lines_out += line.count("\n")
            return line
        closing = re.match(r"^[ \t]{0,3}(`{3,}|~{3,})[ \t]*$", bare)
        self.block.append(line)
        if closing and closing.group(1)[0] == self.fence[0] and len(closing.group(1)) >= len(self.fence):
            return self._close()
        return ""

    def _close(self) -> str:
        raw = "".join(self.block)
        self.block = None
        blocks = extract_code_blocks(raw)
        start = self.block_start
        self.lines_out += raw.count("\n")
        if not blocks:
            return raw
        b = blocks[0]
        self.scanned += 1
        try:
            res = scan_code(b.code, b.language) if b.language else None
        except LlamaforgeError as e:
            self.notes.append(f"code block at line {start}: {e}")
            return raw
        if res is None:
            self.notes.append(f"code block at line {start}" + (f" ({b.tag})" if b.tag else "") +
                              ": language not supported or not recognised; not checked")
            return raw
        found = [dict(f.to_dict(), line=f.line + start) for f in res.findings]
        self.findings += found
        self.notes += res.notes
        for f in found:
            stats.record("code", res.verdict, f["cwe"])
        if res.verdict == "block":
            self.blocked += 1
            worst = [f for f in found if f["severity"] == "error"]
            lines = "; ".join(f"{f['cwe']} at line {f['line']} ({f['message']})" for f in worst[:3])
            return f"[Code Shield withheld this {b.language} code block: {lines}.]\n"
        if res.verdict == "warn":
            self.warned += 1
            lines = "; ".join(f"{f['cwe']} at line {f['line']}: {f['message']}" for f in found[:3])
            note = f"\n> Code Shield warning: {lines}.\n"
            self.lines_out += note.count("\n")
            return raw + note
        return raw

    def finish(self, result: Result) -> list[Delta]:
        tail = ""
        if self.block is not None and self.line:  # the last line, without its newline (maybe the closing fence)
            line, self.line = self.line, ""
            tail += self._line(line)
        if self.block is not None:  # the answer ended inside a code block: scan what there is
            self.block.append("\n" + self.fence[0] * 3 + "\n")
            tail += self._close()
        elif self.line:  # a last partial line held because it began like a fence
            tail += self.line
            self.line = ""
        verdict = "block" if self.blocked else "warn" if self.warned else "pass"
        _extra(result)["code"] = {"verdict": verdict, "findings": self.findings, "blocks": self.scanned,
                                  "notes": self.notes}
        if self.scanned == 0:
            stats.record("code", "pass", "")
        if self.blocked:
            result.finish_reason = "content_filter"
        return [Delta(tail)] if tail else []


def register_stages(register) -> None:
    """Register the guard stages with the seam (`generate.pipeline.register`); the injection filter goes last so
    it sees retrieved passages."""
    register(GuardInputStage())
    register(CodeShieldStage())
    register(GuardOutputStage())
    register(InjectionStage())
