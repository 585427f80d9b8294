"""The output side of tool calling: `ToolCallFilter` turns the model's calls into OpenAI-shaped tool calls.

Text that may still be the start of a call (a prefix of the opener) is held back; once a call begins, its text
never reaches the answer's content: it streams as tool-call deltas instead - first {"index", "id", "type",
"function": {"name", "arguments": ""}} when the name is known, then {"index", "function": {"arguments": piece}}
as the arguments arrive - and the joined pieces are exactly the final call's `arguments` string. At the end the
Result carries `tool_calls` and finish_reason "tool_calls" (a call cut by max_tokens keeps "length").
"""
from __future__ import annotations

import re
import secrets

from ...tokenizer.tool_format import ToolSyntax
from ..stage import Delta, OutputFilter
from .processor import Channel
from ..._fs import loads_json

_WS = " \t\r\n"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class _ArgsScanner:
    """Finds where a JSON value ends, one character at a time."""

    def __init__(self):
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.done = False

    def feed(self, ch: str) -> bool:
        """Take `ch`; False when `ch` is not part of the value (the value ended before it)."""
        if self.done:
            return False
        if not self.started:
            if ch in _WS:
                return True
            self.started = True
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 0:
                    self.done = True
            return True
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            if self.depth == 0:
                self.done = True
                return False
            self.depth -= 1
            if self.depth == 0:
                self.done = True
        elif self.depth == 0 and ch in ",":
            self.done = True
            return False
        return True


class ToolCallFilter(OutputFilter):
    """Parse calls out of one choice's text (see the module docstring).

    mode: "forced" (the answer is calls from its first character), "auto" (text, then maybe calls), "off"
    (tool_choice none: everything is text)."""

    def __init__(self, syntax: ToolSyntax, mode: str, channel: Channel | None = None):
        self.syntax, self.mode, self.channel = syntax, mode, channel
        self.offset = 0          # characters of the choice's text seen so far
        self.pending = ""        # text held back: it may be the start of a call
        self.calls_text = ""     # text from the start of the calls
        self.in_calls = mode == "forced"
        self.calls: list[dict] = []
        self._pos = 0            # parse position in calls_text
        self._args: _ArgsScanner | None = None
        self._header = re.compile(r'\{\s*(?:"[A-Za-z_]+"\s*:\s*"[^"]*"\s*,\s*)*?"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,'
                                  r'\s*"(?:%s|arguments|parameters)"\s*:' % re.escape(syntax.args_key))

    # ---------------------------------------------------------------------------------------------- text side
    def feed(self, deltas: list[Delta]) -> list[Delta]:
        out: list[Delta] = []
        for d in deltas:
            if d.tool_calls:
                out.append(Delta(tool_calls=d.tool_calls))
            if d.text:
                out += self._text(d.text)
        return out

    def _text(self, text: str) -> list[Delta]:
        start = self.offset
        self.offset += len(text)
        if self.mode == "off":
            return [Delta(text)]
        if self.in_calls:
            self.calls_text += text
            return self._parse()
        cut = self.channel.call_start if self.channel is not None else None
        if cut is not None and cut < start + len(text) + len(self.pending):
            # The processor saw a control-token opener at `cut` (characters before it are answer text).
            buf = self.pending + text
            base = start - len(self.pending)
            k = max(0, cut - base)
            self.pending = ""
            self.in_calls = True
            self.calls_text = buf[k:]
            return ([Delta(buf[:k])] if buf[:k] else []) + self._parse()
        buf = self.pending + text
        trig = self.syntax.trigger
        if self.syntax.start_only:
            body = buf.lstrip()
            if body.startswith(trig):
                self.pending, self.in_calls, self.calls_text = "", True, body
                return self._parse()
            if trig.startswith(body) and start - len(self.pending) == 0:
                self.pending = buf
                return []
            self.mode, self.pending = "off", ""  # an answer in text: no call can start later
            return [Delta(buf)]
        if self.syntax.opener_is_control:  # nothing to hold: the processor reports the opener (above)
            self.pending = ""
            return [Delta(buf)] if buf else []
        at = buf.find(trig)
        if at >= 0:
            self.pending, self.in_calls, self.calls_text = "", True, buf[at:]
            return ([Delta(buf[:at])] if at else []) + self._parse()
        hold = next((n for n in range(min(len(trig) - 1, len(buf)), 0, -1) if buf.endswith(trig[:n])), 0)
        self.pending = buf[len(buf) - hold:] if hold else ""
        release = buf[:len(buf) - hold]
        return [Delta(release)] if release else []

    # ---------------------------------------------------------------------------------------------- call side
    def _parse(self) -> list[Delta]:
        out: list[Delta] = []
        while True:
            if self._args is None:
                m = self._header.search(self.calls_text, self._pos)
                if not m:
                    return out
                name = loads_json(f'"{m.group(1)}"')
                call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
                self.calls.append(call)
                out.append(Delta(tool_calls=[{"index": len(self.calls) - 1, "id": call["id"], "type": "function",
                                              "function": {"name": name, "arguments": ""}}]))
                self._pos = m.end()
                self._args = _ArgsScanner()
            piece = []
            while self._pos < len(self.calls_text):
                ch = self.calls_text[self._pos]
                if not self._args.feed(ch):
                    break
                piece.append(ch)
                self._pos += 1
                if self._args.done:
                    break
            text = "".join(piece)
            if not self.calls[-1]["function"]["arguments"]:
                text = text.lstrip(_WS)
            if text:
                self.calls[-1]["function"]["arguments"] += text
                out.append(Delta(tool_calls=[{"index": len(self.calls) - 1, "function": {"arguments": text}}]))
            if not self._args.done:
                return out
            self._args = None

    def finish(self, result) -> list[Delta]:
        out: list[Delta] = []
        if self.pending:
            if self.in_calls:
                self.calls_text += self.pending
            else:
                out.append(Delta(self.pending))
            self.pending = ""
        if self.in_calls:
            out += self._parse()
        if self.calls:
            result.tool_calls = self.calls
            if result.finish_reason == "stop":
                result.finish_reason = "tool_calls"
        elif self.in_calls and self.calls_text.strip():
            out.append(Delta(self.calls_text))  # it never became a call: it is the answer after all
        return out
