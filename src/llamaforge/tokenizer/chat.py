"""Chat formats built at the token level, so message content can never become a control token.

Built-ins: Llama 3 (header ids + <|eot_id|>, Meta's ChatFormat layout), ChatML (<|im_start|>/<|im_end|>) and
Llama 2 ([INST] <<SYS>>, Meta's chat_completion layout). A model's own Jinja template is rendered in a bounded
sandbox with each message content replaced by a sentinel.

Encoding: a format yields parts, either its own structure text or a message content. Control-token text is
recognised in structure parts only; the plain text between two control tokens (structure and content alike)
is then encoded as one run with special tokens disallowed, exactly as a tokenizer encodes a rendered prompt,
so ids match the model's training format while content can never produce a control id.

`chat_format_for(tokenizer, template=None)`: an explicit template wins, then a built-in format recognised from
the vocabulary and template, then the tokenizer's own Jinja template.

Tools: `encode(messages, tools=[...])` lists tool definitions the way each format does, renders assistant turns'
`tool_calls` and `tool` turns (layouts in tool_format.py); `ChatFormat.tool_syntax` is how its model writes calls.
"""
from __future__ import annotations

import abc
import json
import re
import secrets
from typing import Any, Iterable, Sequence

from ..errors import TemplateError
from . import tool_format
from .base import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
Segment = tuple[list[int], bool]  # (ids, trainable)
Part = tuple[str, bool, bool]  # (text, is_content, trainable)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_structure(tok: Tokenizer, text: str) -> list[str | int]:
    split = getattr(tok, "split_special", None)
    if split is not None:
        return split(text)
    from .text import SpecialSplitter
    return list(SpecialSplitter(tok.special_tokens).split(text, True))


def encode_parts(tok: Tokenizer, parts: Sequence[Part], with_mask: bool = True) -> list[Segment]:
    """Encode format parts: control tokens only from structure text; plain text between control tokens is
    encoded as one run (special tokens disallowed). With with_mask, content tokens of trainable parts and a
    stop token following such content are marked trainable (token ownership at run boundaries is decided by
    re-encoding the run's prefixes: a token straddling a boundary belongs to the structure)."""
    items: list = []  # int ids, or (text, is_content, trainable)
    for text, is_content, trainable in parts:
        if not text:
            continue
        if is_content:
            items.append((text, True, trainable))
        else:
            items += [x if isinstance(x, int) else (x, False, False) for x in _split_structure(tok, text)]
    segs: list[Segment] = []
    stops = tok.stop_ids
    pending_eot = False  # the last text run ended with trainable content
    k = 0
    while k < len(items):
        if isinstance(items[k], int):
            segs.append(([items[k]], pending_eot and items[k] in stops))
            pending_eot = False
            k += 1
            continue
        run = []
        while k < len(items) and not isinstance(items[k], int):
            run.append(items[k])
            k += 1
        text = "".join(t for t, _, _ in run)
        ids = tok.encode(text)
        if not with_mask or not any(tr for _, _, tr in run):
            segs.append((ids, False))
            pending_eot = False
            continue
        # Token boundaries of each piece inside the run, from the encodings of the run's prefixes.
        cuts, pos = [0], 0
        for t, _, _ in run[:-1]:
            pos += len(t)
            cuts.append(_common_prefix(tok.encode(text[:pos]), ids))
        cuts.append(len(ids))
        for (t, _, trainable), lo, hi in zip(run, cuts, cuts[1:]):
            segs.append((ids[lo:max(lo, hi)], trainable))
        last_trainable = max((i for i, (_, _, tr) in enumerate(run) if tr), default=-1)
        pending_eot = last_trainable >= 0 and all(not t.strip() for t, _, _ in run[last_trainable + 1:])
    return segs


class Msg(tuple):
    """A validated message: unpacks as (role, content); `tool_calls` (OpenAI-shaped dicts), `tool_call_id` and
    `name` ride along."""

    def __new__(cls, role: str, content: str, tool_calls: Sequence[dict] = (), tool_call_id: str | None = None,
                name: str | None = None):
        self = super().__new__(cls, (role, content))
        self.tool_calls, self.tool_call_id, self.name = tuple(tool_calls), tool_call_id, name
        return self

    @property
    def role(self) -> str:
        return self[0]

    @property
    def content(self) -> str:
        return self[1]


def _tool_calls(m: dict, i: int) -> list[dict]:
    calls = m.get("tool_calls") or []
    if not isinstance(calls, (list, tuple)):
        raise TemplateError(f"message {i} tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                not isinstance(fn.get("arguments", ""), (str, dict)):
            raise TemplateError(f"message {i} tool_calls[{j}] must be {{'function': {{'name', 'arguments'}}}}")
        out.append({"id": c.get("id"), "type": "function",
                    "function": {"name": fn["name"], "arguments": fn.get("arguments", "")}})
    return out


def _content(m: Any, i: int) -> Msg:
    if not isinstance(m, dict):
        raise TemplateError(f"message {i} must be an object with 'role' and 'content'")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise TemplateError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if isinstance(content, list):  # OpenAI-style content parts: keep the text ones
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if not all(isinstance(t, str) for t in texts):
            raise TemplateError(f"message {i} has malformed content parts")
        content = "".join(texts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise TemplateError(f"message {i} content must be a string")
    return Msg(role, content, _tool_calls(m, i) if role == "assistant" else (),
               m.get("tool_call_id") if role == "tool" else None, m.get("name"))


def normalize_messages(messages: Iterable[Any]) -> list[Msg]:
    """[Msg (role, content)] after validation; unknown roles and malformed messages raise TemplateError."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise TemplateError("messages must be a list of {'role', 'content'} objects")
    return [_content(m, i) for i, m in enumerate(messages)]


class ChatFormat(abc.ABC):
    """Turns a conversation into prompt ids. Subclasses implement `_segments`."""

    name = "chat"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    tool_syntax: tool_format.ToolSyntax = tool_format.HERMES

    def _parts(self, msgs: list[Msg], add_generation_prompt: bool) -> list[Part]:
        """Ordered (text, is_content, trainable) parts; trainable marks assistant content."""
        raise NotImplementedError

    def _segments(self, msgs: list[Msg], add_generation_prompt: bool, with_mask: bool = True) -> list[Segment]:
        """Ordered (ids, trainable) pieces; trainable = assistant content and the stop token right after it."""
        return encode_parts(self.tokenizer, self._parts(msgs, add_generation_prompt), with_mask)

    def _tool_messages(self, msgs: list[Msg], tools, today) -> list[Msg]:
        """The conversation with tools listed and tool calls/results written as text (the Hermes convention).
        Formats with a tool layout of their own override `_segments_with_tools` instead."""
        return _hermes_messages(msgs, tools, tool_role="tool")

    def _segments_with_tools(self, msgs, add_generation_prompt, with_mask, tools, today) -> list[Segment]:
        if not tools and not any(m.tool_calls or m.role == "tool" for m in msgs):
            return self._segments(msgs, add_generation_prompt, with_mask)
        return self._segments(self._tool_messages(msgs, tools, today), add_generation_prompt, with_mask)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.tokenizer.stop_ids

    def encode(self, messages, add_generation_prompt: bool = True, *, tools=None, today=None) -> list[int]:
        """Prompt ids for `messages`, ending with the assistant header when add_generation_prompt is True.

        tools: function tools (OpenAI-shaped dicts) the model may call; today: the date some layouts show
        (default: today)."""
        segs = self._segments_with_tools(normalize_messages(messages), add_generation_prompt, False,
                                         tool_format.tool_dicts(tools or ()), today)
        return [i for ids, _ in segs for i in ids]

    def encode_with_mask(self, messages, *, tools=None, today=None) -> tuple[list[int], list[bool]]:
        """(ids, mask) for training: mask is True on every assistant turn's content and end-of-turn token."""
        ids: list[int] = []
        mask: list[bool] = []
        for seg, trainable in self._segments_with_tools(normalize_messages(messages), False, True,
                                                        tool_format.tool_dicts(tools or ()), today):
            ids.extend(seg)
            mask.extend([trainable] * len(seg))
        return ids, mask

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt as text, control tokens shown (for display and debugging)."""
        return self.tokenizer.decode(self.encode(messages, add_generation_prompt, **kwargs), skip_special=False)

    def _special(self, name: str) -> int:
        i = self.tokenizer.special_tokens.get(name)
        if i is None:
            raise TemplateError(f"the vocabulary has no {name} token required by the {self.name} format")
        return i


def _hermes_messages(msgs: Sequence[Msg], tools: Sequence[dict], tool_role: str) -> list[Msg]:
    """Tools listed in the system prompt, assistant calls as <tool_call> blocks after the answer text, runs of
    tool results as one `tool_role` turn of <tool_response> blocks."""
    out: list[Msg] = []
    msgs = list(msgs)
    if tools:
        block = tool_format.hermes_tools_block(tools)
        if msgs and msgs[0].role == "system":
            msgs[0] = Msg("system", (msgs[0].content.rstrip() + "\n\n" + block) if msgs[0].content.strip()
                          else block)
        else:
            msgs.insert(0, Msg("system", block))
    for m in msgs:
        if m.role == "assistant" and m.tool_calls:
            calls = tool_format.HERMES.calls_text(m.tool_calls)
            out.append(Msg("assistant", (m.content.rstrip() + "\n" + calls) if m.content.strip() else calls))
        elif m.role == "tool":
            block = tool_format.tool_response_block(m.content)
            if out and out[-1].role == tool_role and getattr(out[-1], "tool_calls", None) == ("results",):
                out[-1] = Msg(tool_role, out[-1].content + "\n" + block, ("results",))
            else:
                out.append(Msg(tool_role, block, ("results",)))
        elif m.role == tool_role and out and out[-1].role == tool_role and out[-1].tool_calls == ("results",):
            out[-1] = Msg(tool_role, out[-1].content + "\n" + m.content)  # results and the next user words
        else:
            out.append(Msg(m.role, m.content))
    return [Msg(m.role, m.content) for m in out]


class Llama3Format(ChatFormat):
    """<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>... (Meta's layout)."""

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.start, self.end = self._special("<|start_header_id|>"), self._special("<|end_header_id|>")
        self.eot = self._special("<|eot_id|>")
        self.bos = tokenizer.special_tokens.get("<|begin_of_text|>", tokenizer.bos_id)

    tool_syntax = tool_format.LLAMA3_JSON

    def _parts(self, msgs, add_generation_prompt, tools=(), today=None):
        parts: list[Part] = [(self.tokenizer.id_to_piece(self.bos), False, False)] if self.bos is not None else []
        tool_turn = None
        if tools:
            # Meta's JSON tool calling: "Environment: ipython" and the dates open the system turn; the function
            # list is a user turn of its own, just before the conversation's first user message.
            system = msgs[0].content if msgs and msgs[0].role == "system" else None
            msgs = [Msg("system", tool_format.llama3_system(system, today))] + \
                msgs[1 if system is not None else 0:]
            tool_turn = tool_format.llama3_tools_message(tools)
        for i, m in enumerate(msgs):
            role, content = m
            if tool_turn is not None and role == "user":
                parts += self._turn("user", tool_turn)
                tool_turn = None
            if role == "assistant" and m.tool_calls:
                parts.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False, False))
                if content.strip():
                    parts.append((content.strip(), True, True))
                parts += [("<|python_tag|>", False, False),
                          (self.tool_syntax.separator.join(self.tool_syntax.call_json(c["function"]["name"],
                                                           tool_format.arguments_of(c)) for c in m.tool_calls),
                           True, True), ("<|eom_id|>", False, False)]
                continue
            text = content if (tools and i == 0) else content.strip()  # the tool system turn keeps its newline
            parts += self._turn("ipython" if role == "tool" else role, text, role == "assistant")
        if tool_turn is not None:
            parts += self._turn("user", tool_turn)
        if add_generation_prompt:
            parts.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False, False))
        return parts

    @staticmethod
    def _turn(role: str, text: str, trainable: bool = False) -> list[Part]:
        return [(f"<|start_header_id|>{role}<|end_header_id|>\n\n", False, False), (text, True, trainable),
                ("<|eot_id|>", False, False)]

    def _segments_with_tools(self, msgs, add_generation_prompt, with_mask, tools, today):
        if "<|python_tag|>" not in self.tokenizer.special_tokens or "<|eom_id|>" not in \
                self.tokenizer.special_tokens:
            if tools or any(m.tool_calls for m in msgs):
                raise TemplateError("this Llama 3 vocabulary has no <|python_tag|>/<|eom_id|> tokens for tool calls")
        return encode_parts(self.tokenizer, self._parts(msgs, add_generation_prompt, tools, today), with_mask)

    @property
    def stop_ids(self):
        return frozenset(self.tokenizer.stop_ids | {self.eot})


class ChatMLFormat(ChatFormat):
    """<|im_start|>role\\ncontent<|im_end|>\\n ... ; optional default system prompt (as SmolLM2's template)."""

    name = "chatml"

    def __init__(self, tokenizer: Tokenizer, default_system: str | None = None):
        super().__init__(tokenizer)
        self.im_start, self.im_end = self._special("<|im_start|>"), self._special("<|im_end|>")
        self.default_system = default_system

    def _parts(self, msgs, add_generation_prompt):
        if self.default_system is not None and (not msgs or msgs[0][0] != "system"):
            msgs = [("system", self.default_system)] + msgs
        tok = self.tokenizer
        parts: list[Part] = []
        if tok.add_bos and tok.bos_id is not None:
            parts.append((tok.id_to_piece(tok.bos_id), False, False))
        for role, content in msgs:
            parts += [(f"<|im_start|>{role}\n", False, False), (content, True, role == "assistant"),
                      ("<|im_end|>\n", False, False)]
        if add_generation_prompt:
            parts.append(("<|im_start|>assistant\n", False, False))
        return parts

    def _tool_messages(self, msgs, tools, today):
        if self.default_system is not None and (not msgs or msgs[0].role != "system"):
            msgs = [Msg("system", self.default_system)] + list(msgs)
        return _hermes_messages(msgs, tools, tool_role="tool")

    @property
    def stop_ids(self):
        return frozenset(self.tokenizer.stop_ids | {self.im_end})


class Llama2Format(ChatFormat):
    """Meta's Llama 2 chat layout: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>..."""

    name = "llama2"
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise TemplateError("the llama2 format needs BOS and EOS tokens")

    def _tool_messages(self, msgs, tools, today):
        return _hermes_messages(msgs, tools, tool_role="user")  # results fill the user's turn

    def _segments(self, msgs, add_generation_prompt, with_mask=True):
        if msgs and msgs[0][0] == "system":
            if len(msgs) == 1:
                msgs = [("user", self.B_SYS + msgs[0][1] + self.E_SYS)]
            else:
                msgs = [(msgs[1][0], self.B_SYS + msgs[0][1] + self.E_SYS + msgs[1][1])] + msgs[2:]
        for i, (role, _) in enumerate(msgs):
            if role != ("user" if i % 2 == 0 else "assistant"):
                raise TemplateError("the llama2 format needs an optional system message, then alternating "
                                    "user/assistant messages starting with user")
        tok, bos, eos = self.tokenizer, self.tokenizer.bos_id, self.tokenizer.eos_id
        segs: list[Segment] = []
        for k in range(0, len(msgs), 2):
            user = msgs[k][1].strip()
            prompt = f"{self.B_INST} {user} {self.E_INST}"
            if k + 1 < len(msgs):
                full = tok.encode(f"{prompt} {msgs[k + 1][1].strip()} ")
                n = _common_prefix(tok.encode(prompt), full)  # the answer starts where the encodings part
                segs += [([bos] + full[:n], False), (full[n:] + [eos], True)]
            else:  # a trailing user turn is the prompt itself
                segs.append(([bos] + tok.encode(prompt), False))
        return segs


class JinjaChatFormat(ChatFormat):
    """A model's own Jinja template, rendered in the bounded sandbox (see jinja_sandbox.py).

    Injection-proof encoding: the template is rendered with every message content replaced by a unique
    sentinel; control-token text is recognised only in the text around sentinels (the template's own
    structure), never in contents. The template may trim a content or write it as a JSON string; a rendering that
    differs from the sentinel rendering in any other way is refused with TemplateError.
    """

    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, template: str, *, max_output: int | None = None, **extra_context):
        from .jinja_sandbox import MAX_OUTPUT_CHARS, ChatTemplate
        super().__init__(tokenizer)
        self.template = ChatTemplate(template, max_output or MAX_OUTPUT_CHARS)
        self.extra = extra_context
        self._handles_tools: bool | None = None

    def _context(self, msgs, add_generation_prompt, tools=()):
        tok = self.tokenizer

        def piece(i):
            return tok.id_to_piece(i) if i is not None else ""
        extra = dict(self.extra)
        if tools:
            extra["tools"] = list(tools)
        size = sum(len(m[1]) for m in msgs) + (len(json.dumps(list(tools), ensure_ascii=False)) if tools else 0)
        # The output bound grows with the conversation (twice its size), never with the template's whims.
        return dict(extra, messages=[_template_message(m) for m in msgs],
                    add_generation_prompt=add_generation_prompt, bos_token=piece(tok.bos_id),
                    eos_token=piece(tok.eos_id), extra_output=2 * size)

    def render_text(self, messages, add_generation_prompt: bool = True, *, tools=None) -> str:
        """The template's own rendering of `messages` (what transformers' apply_chat_template prints)."""
        return self.template.render(**self._context(normalize_messages(messages), add_generation_prompt,
                                                    tool_format.tool_dicts(tools or ())))

    @property
    def handles_tools(self) -> bool:
        """Whether the template lists `tools` itself (else the Hermes convention is written into the messages)."""
        if self._handles_tools is None:
            probe = [Msg("user", "probe")]
            tool = tool_format.tool_dicts([{"name": "probe_tool", "description": "", "parameters": {}}])
            try:
                self._handles_tools = self.template.render(**self._context(probe, True, tool)) != \
                    self.template.render(**self._context(probe, True))
            except TemplateError:
                self._handles_tools = False
        return self._handles_tools

    @property
    def tool_syntax(self):
        src = self.template.source
        if not self.handles_tools or "<tool_call>" in src:
            return tool_format.HERMES
        if "<|python_tag|>" in src or "ipython" in src:
            return tool_format.LLAMA3_HF
        return tool_format.HERMES

    def _segments_with_tools(self, msgs, add_generation_prompt, with_mask, tools, today):
        if not tools and not any(m.tool_calls or m.role == "tool" for m in msgs):
            return self._segments(msgs, add_generation_prompt, with_mask)
        if not self.handles_tools:
            return self._segments(_hermes_messages(msgs, tools, tool_role="tool"), add_generation_prompt, with_mask)
        # Tool definitions and call arguments are rendered by the template as structure: control-token text in
        # them would become control tokens, so it is refused (message contents are protected by sentinels).
        specials = [t for t in self.tokenizer.special_tokens if t]
        for where, value in [("tools", tools)] + [(f"message {i} tool_calls", m.tool_calls)
                                                   for i, m in enumerate(msgs)]:
            if _has_special(value, specials):
                raise TemplateError(f"{where} contain control-token text")
        return encode_parts(self.tokenizer, self._parts(msgs, add_generation_prompt, tools), with_mask)

    def _pieces(self, msgs, add_generation_prompt, tools=()) -> list[tuple[str, int | None]]:
        """[(text, message index or None for template structure)] that join to the real rendering."""
        nonce = secrets.token_hex(8)
        # An empty content stays empty (templates test it: `if message.content`); it has nothing to protect.
        marks = [f"\ue000{nonce}:{i}\ue001" if m[1] else "" for i, m in enumerate(msgs)]
        shaped = self.template.render(**self._context(
            [Msg(m[0], s, getattr(m, "tool_calls", ()), getattr(m, "tool_call_id", None), getattr(m, "name", None))
             for m, s in zip(msgs, marks)], add_generation_prompt, tools))
        real = self.template.render(**self._context(msgs, add_generation_prompt, tools))
        sentinels = [s for s in marks if s]
        index = {s: i for i, s in enumerate(marks) if s}

        raw = re.split("(" + "|".join(map(re.escape, sentinels)) + ")", shaped) if sentinels else [shaped]
        raw = [(p, index.get(p)) for p in raw if p]
        # Align with the real rendering: structure must match verbatim; each content may have been trimmed
        # by the template (either side). Any other difference means content leaked into the structure.
        pieces: list[tuple[str, int | None]] = []
        pos = 0
        for k, (p, idx) in enumerate(raw):
            if idx is None:
                if not real.startswith(p, pos):
                    break
                pieces.append((p, None))
                pos += len(p)
                continue
            nxt = raw[k + 1][0] if k + 1 < len(raw) and raw[k + 1][1] is None else None
            content = msgs[idx][1]
            # Trimmed, or escaped as a JSON string (Meta's template writes tool results with `tojson`).
            escaped = json.dumps(content, ensure_ascii=False)[1:-1]
            for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip(), escaped)):
                end = pos + len(cand)
                if real.startswith(cand, pos) and (nxt is None or real.startswith(nxt, end)) and \
                        (k + 1 < len(raw) or end == len(real)):
                    pieces.append((cand, idx))
                    pos = end
                    break
            else:
                break
        else:
            if pos == len(real):
                return pieces
        raise TemplateError("the chat template transforms message content in a way that cannot be encoded "
                            "safely (only trimming is supported)")

    def _parts(self, msgs, add_generation_prompt, tools=()):
        return [(text, idx is not None, idx is not None and msgs[idx][0] == "assistant")
                for text, idx in self._pieces(msgs, add_generation_prompt, tools)]


def _template_message(m) -> dict:
    """A message as transformers hands it to a template: tool calls with their arguments as objects."""
    out: dict = {"role": m[0], "content": m[1]}
    if not isinstance(m, Msg):
        return out
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
            "name": c["function"]["name"], "arguments": tool_format.arguments_of(c)}} for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _has_special(value: Any, specials: Sequence[str]) -> bool:
    if isinstance(value, str):
        return any(t in value for t in specials)
    if isinstance(value, dict):
        return any(_has_special(k, specials) or _has_special(v, specials) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_special(v, specials) for v in value)
    return False


def _default_system(tokenizer: Tokenizer, template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (SmolLM2 does)."""
    if not template or "<|im_start|>system" not in template:
        return None
    try:
        fmt = JinjaChatFormat(tokenizer, template)
        marker = "\ue000probe\ue001"
        text = fmt.render_text([{"role": "user", "content": marker}], add_generation_prompt=False)
    except TemplateError:
        return None
    head = "<|im_start|>system\n"
    if text.startswith(head) and "<|im_end|>" in text and marker in text:
        body = text[len(head):text.index("<|im_end|>")]
        return body if marker not in body else None
    return None


def detect_format(tokenizer: Tokenizer, template: str | None = None) -> str | None:
    """"llama3", "chatml", "llama2" or None, from the vocabulary and the template text."""
    specials = tokenizer.special_tokens
    t = template or ""
    if "<|start_header_id|>" in specials and "<|eot_id|>" in specials and (not t or "<|start_header_id|>" in t):
        return "llama3"
    if "<|im_start|>" in specials and "<|im_end|>" in specials and (not t or "<|im_start|>" in t):
        return "chatml"
    if (not t and getattr(tokenizer, "strip_leading_space", False)) or ("[INST]" in t and "<<SYS>>" in t):
        return "llama2"
    return None


def chat_format_for(tokenizer: Tokenizer, template: str | None = None) -> ChatFormat:
    """Pick the chat format: an explicit `template` (a built-in name or Jinja source) wins; then a built-in
    format recognised from the vocabulary/template; then the tokenizer's own Jinja template."""
    if template in ("llama3", "chatml", "llama2"):
        return _builtin(template, tokenizer, tokenizer.chat_template)
    if template:
        return JinjaChatFormat(tokenizer, template)
    kind = detect_format(tokenizer, tokenizer.chat_template)
    if kind:
        return _builtin(kind, tokenizer, tokenizer.chat_template)
    if tokenizer.chat_template:
        return JinjaChatFormat(tokenizer, tokenizer.chat_template)
    raise TemplateError("no chat format: the tokenizer has no chat template and no known chat tokens")


def _builtin(kind: str, tokenizer: Tokenizer, template: str | None) -> ChatFormat:
    if kind == "llama3":
        return Llama3Format(tokenizer)
    if kind == "chatml":
        return ChatMLFormat(tokenizer, default_system=_default_system(tokenizer, template))
    return Llama2Format(tokenizer)
