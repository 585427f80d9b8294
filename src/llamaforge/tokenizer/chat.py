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
"""
from __future__ import annotations

import abc
import re
import secrets
from typing import Any, Iterable, Sequence

from ..errors import TemplateError
from .base import Tokenizer

ROLES = ("system", "user", "assistant")
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


def _content(m: Any, i: int) -> tuple[str, str]:
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
    return role, content


def normalize_messages(messages: Iterable[Any]) -> list[tuple[str, str]]:
    """[(role, content)] after validation; unknown roles and malformed messages raise TemplateError."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Iterable):
        raise TemplateError("messages must be a list of {'role', 'content'} objects")
    return [_content(m, i) for i, m in enumerate(messages)]


class ChatFormat(abc.ABC):
    """Turns a conversation into prompt ids. Subclasses implement `_segments`."""

    name = "chat"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def _parts(self, msgs: list[tuple[str, str]], add_generation_prompt: bool) -> list[Part]:
        """Ordered (text, is_content, trainable) parts; trainable marks assistant content."""
        raise NotImplementedError

    def _segments(self, msgs: list[tuple[str, str]], add_generation_prompt: bool,
                  with_mask: bool = True) -> list[Segment]:
        """Ordered (ids, trainable) pieces; trainable = assistant content and the stop token right after it."""
        return encode_parts(self.tokenizer, self._parts(msgs, add_generation_prompt), with_mask)

    @property
    def stop_ids(self) -> frozenset[int]:
        return self.tokenizer.stop_ids

    def encode(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for `messages`, ending with the assistant header when add_generation_prompt is True."""
        segs = self._segments(normalize_messages(messages), add_generation_prompt, with_mask=False)
        return [i for ids, _ in segs for i in ids]

    def encode_with_mask(self, messages) -> tuple[list[int], list[bool]]:
        """(ids, mask) for training: mask is True on every assistant turn's content and end-of-turn token."""
        ids: list[int] = []
        mask: list[bool] = []
        for seg, trainable in self._segments(normalize_messages(messages), False):
            ids.extend(seg)
            mask.extend([trainable] * len(seg))
        return ids, mask

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt as text, control tokens shown (for display and debugging)."""
        return self.tokenizer.decode(self.encode(messages, add_generation_prompt), skip_special=False)

    def _special(self, name: str) -> int:
        i = self.tokenizer.special_tokens.get(name)
        if i is None:
            raise TemplateError(f"the vocabulary has no {name} token required by the {self.name} format")
        return i


class Llama3Format(ChatFormat):
    """<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>... (Meta's layout)."""

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.start, self.end = self._special("<|start_header_id|>"), self._special("<|end_header_id|>")
        self.eot = self._special("<|eot_id|>")
        self.bos = tokenizer.special_tokens.get("<|begin_of_text|>", tokenizer.bos_id)

    def _parts(self, msgs, add_generation_prompt):
        parts: list[Part] = [(self.tokenizer.id_to_piece(self.bos), False, False)] if self.bos is not None else []
        for role, content in msgs:
            parts += [(f"<|start_header_id|>{role}<|end_header_id|>\n\n", False, False),
                      (content.strip(), True, role == "assistant"), ("<|eot_id|>", False, False)]
        if add_generation_prompt:
            parts.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False, False))
        return parts

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
    structure), never in contents. The template may trim a content; a rendering that differs from the
    sentinel rendering in any other way is refused with TemplateError.
    """

    name = "jinja"

    def __init__(self, tokenizer: Tokenizer, template: str, *, max_output: int | None = None, **extra_context):
        from .jinja_sandbox import MAX_OUTPUT_CHARS, ChatTemplate
        super().__init__(tokenizer)
        self.template = ChatTemplate(template, max_output or MAX_OUTPUT_CHARS)
        self.extra = extra_context

    def _context(self, msgs, add_generation_prompt):
        tok = self.tokenizer

        def piece(i):
            return tok.id_to_piece(i) if i is not None else ""
        # The output bound grows with the conversation (twice its size), never with the template's whims.
        return dict(self.extra, messages=[{"role": r, "content": c} for r, c in msgs],
                    add_generation_prompt=add_generation_prompt, bos_token=piece(tok.bos_id),
                    eos_token=piece(tok.eos_id), extra_output=2 * sum(len(c) for _, c in msgs))

    def render_text(self, messages, add_generation_prompt: bool = True) -> str:
        """The template's own rendering of `messages` (what transformers' apply_chat_template prints)."""
        return self.template.render(**self._context(normalize_messages(messages), add_generation_prompt))

    def _pieces(self, msgs, add_generation_prompt) -> list[tuple[str, int | None]]:
        """[(text, message index or None for template structure)] that join to the real rendering."""
        nonce = secrets.token_hex(8)
        sentinels = [f"\ue000{nonce}:{i}\ue001" for i in range(len(msgs))]
        shaped = self.template.render(**self._context(
            [(r, s) for (r, _), s in zip(msgs, sentinels)], add_generation_prompt))
        real = self.template.render(**self._context(msgs, add_generation_prompt))
        index = {s: i for i, s in enumerate(sentinels)}

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
            for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
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

    def _parts(self, msgs, add_generation_prompt):
        return [(text, idx is not None, idx is not None and msgs[idx][0] == "assistant")
                for text, idx in self._pieces(msgs, add_generation_prompt)]


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
