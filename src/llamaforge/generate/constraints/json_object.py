"""JSON mode (`response_format: {"type": "json_object"}`, Ollama `format: "json"`): a logits processor that only
lets the model produce a prefix of one valid JSON object, and lets it stop only once the object is complete.

`JsonPrefix` is an incremental JSON recogniser (RFC 8259 grammar, one character at a time). At each step the
processor checks the most likely candidate tokens in order and masks every other token to -inf, so the
sampler can only pick tokens that keep the output valid. Checking candidates in logit order means greedy
decoding examines only a few tokens per step.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..stage import PlanContext, Stage

_WS = " \t\n\r"
_MAX_WS_RUN = 2      # outside strings: stops a model from padding forever with whitespace
CANDIDATES = 64      # candidates checked per step before widening the search


class JsonPrefix:
    """State of a JSON-object prefix. `feed(ch)` -> False if `ch` cannot continue valid JSON."""

    __slots__ = ("stack", "state", "lit", "num", "ws", "key")

    def __init__(self):
        self.stack: list[str] = []   # "{" / "["
        self.state = "start"         # start, value, key_or_end, key, colon, after, string, escape, u1..u4,
        self.lit = ""                # literal chars still expected (true/false/null)
        self.num = ""                # number sub-state
        self.ws = 0
        self.key = False             # the string being read is an object key

    def copy(self) -> "JsonPrefix":
        c = JsonPrefix.__new__(JsonPrefix)
        c.stack, c.state, c.lit, c.num, c.ws, c.key = list(self.stack), self.state, self.lit, self.num, self.ws, \
            self.key
        return c

    @property
    def complete(self) -> bool:
        return self.state == "done" or (self.state == "after" and not self.stack)

    def feed_text(self, text: str) -> bool:
        return all(self.feed(ch) for ch in text)

    def feed(self, ch: str) -> bool:
        s = self.state
        if s == "string":
            if ch == '"':
                self._end_value(after_key=self.key)
            elif ch == "\\":
                self.state = "escape"
            elif ord(ch) < 0x20:
                return False
            return True
        if s == "escape":
            if ch == "u":
                self.state = "u4"
            elif ch in '"\\/bfnrt':
                self.state = "string"
            else:
                return False
            return True
        if s[0] == "u" and s[1:].isdigit():
            if ch not in "0123456789abcdefABCDEF":
                return False
            left = int(s[1:]) - 1
            self.state = "string" if left == 0 else f"u{left}"
            return True
        if s == "literal":
            if ch != self.lit[0]:
                return False
            self.lit = self.lit[1:]
            if not self.lit:
                self._end_value()
            return True
        if s == "number":
            nxt = _number_step(self.num, ch)
            if nxt is not None:
                self.num = nxt
                return True
            if self.num not in _NUM_FINAL:
                return False
            self._end_value()
            return self.feed(ch)  # the character after a number belongs to what follows
        if ch in _WS:
            if s == "done" or self.ws >= _MAX_WS_RUN:
                return False
            self.ws += 1
            return True
        self.ws = 0
        if s == "start":
            if ch != "{":
                return False  # json_object: the top level is an object
            self.stack.append("{")
            self.state = "key_or_end"
            return True
        if s in ("value", "value_or_end"):
            if s == "value_or_end" and ch == "]":
                self.stack.pop()
                self._end_value()
                return True
            return self._start_value(ch)
        if s in ("key_or_end", "key"):
            if ch == '"':
                self.state, self.key = "string", True
                return True
            if s == "key_or_end" and ch == "}":
                self.stack.pop()
                self._end_value()
                return True
            return False
        if s == "colon":
            if ch != ":":
                return False
            self.state = "value"
            return True
        if s == "after":
            if not self.stack:
                return False
            top = self.stack[-1]
            if ch == ",":
                self.state = "key" if top == "{" else "value"
                return True
            if (ch == "}" and top == "{") or (ch == "]" and top == "["):
                self.stack.pop()
                self._end_value()
                return True
            return False
        return False  # "done": nothing may follow

    def _start_value(self, ch: str) -> bool:
        if ch == '"':
            self.state, self.key = "string", False
        elif ch == "{":
            self.stack.append("{")
            self.state = "key_or_end"
        elif ch == "[":
            self.stack.append("[")
            self.state = "value_or_end"
        elif ch in "tfn":
            self.state, self.lit = "literal", {"t": "rue", "f": "alse", "n": "ull"}[ch]
        elif ch == "-" or ch.isdigit() and ch.isascii():
            self.state, self.num = "number", _number_step("", ch)
        else:
            return False
        return True

    def _end_value(self, after_key: bool = False) -> None:
        self.ws = 0
        if after_key:
            self.state, self.key = "colon", False
        else:
            self.state = "after" if self.stack else "done"


# Number sub-states: sign, zero, int, dot, frac, e, esign, exp. Final ones may end the number.
_NUM_FINAL = {"zero", "int", "frac", "exp"}


def _number_step(state: str, ch: str) -> str | None:
    digit = ch.isascii() and ch.isdigit()
    if state == "":
        return "sign" if ch == "-" else ("zero" if ch == "0" else ("int" if digit else None))
    if state == "sign":
        return "zero" if ch == "0" else ("int" if digit else None)
    if state in ("zero", "int"):
        if digit and state == "int":
            return "int"
        return "dot" if ch == "." else ("e" if ch in "eE" else None)
    if state in ("dot", "frac"):
        if digit:
            return "frac"
        return "e" if state == "frac" and ch in "eE" else None
    if state == "e":
        return "esign" if ch in "+-" else ("exp" if digit else None)
    if state in ("esign", "exp"):
        return "exp" if digit else None
    return None


class JsonLogitsProcessor:
    """Masks tokens that would break the JSON object; allows the stop tokens only once it is complete."""

    def __init__(self, tokenizer, stop_ids: Sequence[int]):
        self.tok = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.state = JsonPrefix()
        self.decoder = tokenizer.stream_decoder()
        self.seen: int | None = None  # how many of token_ids are already reflected in `state`

    def _catch_up(self, token_ids: Sequence[int]) -> None:
        if self.seen is None:
            self.seen = len(token_ids)  # the prompt: not part of the JSON
            return
        for t in token_ids[self.seen:]:
            self.state.feed_text(self.decoder.feed(t))
        self.seen = len(token_ids)

    def _ok(self, token_id: int) -> bool:
        if token_id in self.stop_ids:
            return self.state.complete
        if self.tok.is_special(token_id):
            return False
        text = self.tok.token_bytes(token_id).decode("utf-8", errors="replace")
        if not text:
            return False
        return self.state.copy().feed_text(text)

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self._catch_up(token_ids)
        order = torch.argsort(logits, descending=True)
        allowed: list[int] = []
        start = 0
        while not allowed and start < order.numel():
            for t in order[start:start + CANDIDATES].tolist():
                if self._ok(t):
                    allowed.append(t)
            start += CANDIDATES
        if not allowed:
            allowed = sorted(self.stop_ids)  # nothing can continue: end the output
        mask = torch.full_like(logits, float("-inf"))
        idx = torch.tensor(allowed, dtype=torch.long, device=logits.device)
        mask[idx] = logits[idx]
        return mask


JSON_INSTRUCTION = "Respond only with a single valid JSON object. Do not write anything before or after it."


class JsonObjectStage(Stage):
    """Constraint kind "json": tell the model to answer in JSON and allow only tokens that keep one JSON object
    valid (it may stop only once the object is complete)."""

    name = "json_object"
    provides = ("json",)

    def applies(self, request) -> bool:
        return request.constraint is not None and request.constraint.kind == "json"

    def prepare(self, ctx: PlanContext) -> None:
        msgs = ctx.messages
        if msgs is None:
            return
        if msgs and msgs[0]["role"] == "system":
            msgs[0] = dict(msgs[0], content=msgs[0]["content"].rstrip() + "\n\n" + JSON_INSTRUCTION)
        else:
            msgs.insert(0, {"role": "system", "content": JSON_INSTRUCTION})

    def processors(self, plan) -> list:
        tok = plan.lm.tokenizer
        stops = set(getattr(tok, "stop_ids", ()) or ()) | set(plan.params.stop_ids)
        return [JsonLogitsProcessor(tok, sorted(stops))]
