"""Logits processors of tool calling, one per generated row.

- `CallProcessor`: the call grammar (grammar.py). Forced ("required", a named function, or tools together with
  a response format): from the first token. "auto": the model writes freely until it opens a call (the chat
  format's opener: a control token such as <|python_tag|>, or text such as "<tool_call>"), and from there on the
  grammar holds, so a call the model starts always completes, parses and validates. It tells the row's output
  filter where the calls begin (`Channel`): a control-token opener leaves no trace in the text.
- `OpenerBan` ("none"): the opener can never be produced (its control token masked; for a text opener, every
  token that would complete it, from sets computed once per tokenizer).
"""
from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch

from ...tokenizer.tool_format import ToolSyntax
from ..constraints.engine import Grammar
from ..constraints.processor import GrammarLogitsProcessor


class Channel:
    """What a row's processor tells the row's output filter: the character offset where the calls begin."""

    def __init__(self):
        self.call_start: int | None = None


class _Text:
    """The generated text so far, decoded as the engine decodes it (after the prompt)."""

    def __init__(self, tok):
        self.tok = tok
        self.decoder = None
        self.text = ""
        self.seen: int | None = None

    def advance(self, token_ids: Sequence[int], on_token=None) -> None:
        if self.seen is None:
            self.decoder = self.tok.stream_decoder()
            for t in token_ids:
                self.decoder.feed(t)
            self.seen = len(token_ids)
            return
        for k in range(self.seen, len(token_ids)):
            t = token_ids[k]
            before = len(self.text)
            self.text += self.decoder.feed(t)
            if on_token is not None:
                on_token(t, before, k)
        self.seen = len(token_ids)


class CallProcessor:
    """Enforce `grammar` (calls of the offered tools) from the start (`forced`) or from the model's opener."""

    def __init__(self, grammar: Grammar, syntax: ToolSyntax, tok, stop_ids, channel: Channel, *, forced: bool):
        self.grammar, self.syntax, self.tok, self.stops = grammar, syntax, tok, list(stop_ids)
        self.channel = channel
        self.forced = forced
        self.inner: GrammarLogitsProcessor | None = None
        self._text = _Text(tok)
        self._opener_id = tok.special_tokens.get(syntax.opener) if syntax.opener_is_control else None
        self._given_up = False

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self.inner is None and self.forced:
            self.inner = GrammarLogitsProcessor(self.grammar, self.stops)
        if self.inner is not None:
            # Only a control-token opener still to be seen needs the decoded text (its offset, _note_opener):
            # skipping it otherwise saves a stream decode per token.
            if self._opener_id is not None and self.channel.call_start is None:
                self._text.advance(token_ids, self._note_opener)
            return self.inner(token_ids, logits)
        self._text.advance(token_ids, self._watch)
        if self.inner is not None:
            return self.inner(token_ids, logits)
        return logits

    def _note_opener(self, token: int, offset: int, index: int) -> None:
        if token == self._opener_id and self.channel.call_start is None:
            self.channel.call_start = offset

    def _watch(self, token: int, offset: int, index: int) -> None:
        """Free text so far: start the grammar where the model opens a call."""
        if self.inner is not None or self._given_up:
            return
        s = self.syntax
        if s.opener_is_control:
            if token == self._opener_id:
                self._start(offset, [token], index + 1)
            return
        text = self._text.text
        if s.start_only:
            body = text.lstrip()
            if body.startswith(s.trigger):
                self._start(len(text) - len(body), None, index + 1, body)
            elif not s.trigger.startswith(body):
                self._given_up = True  # the answer is text
            return
        at = text.find(s.trigger, max(0, offset - len(s.trigger)))
        if at >= 0:
            self._start(at, None, index + 1, text[at:])

    def _start(self, offset: int, ids, seen: int, text: str | None = None) -> None:
        m = self.grammar.matcher()
        if ids is None:  # the call's text so far, as tokens (matching is on bytes, any tokenization fits)
            ids = self.grammar.lltok.greedy_tokenize(text)
        if m.try_consume_tokens(list(ids)) != len(ids):
            self._given_up = True  # not the start of a call after all (the filter will read it as text)
            return
        self.channel.call_start = offset
        self.inner = GrammarLogitsProcessor(self.grammar, self.stops, matcher=m, seen=seen)


_ban_sets: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ban_lock = threading.Lock()


def _completing_ids(tok, opener: str) -> list[torch.Tensor]:
    """For k = 0..len(opener)-1: ids whose text, after a text ending in opener[:k], completes the opener
    (k = 0: ids containing it whole). Computed once per (tokenizer, opener)."""
    with _ban_lock:
        per_tok = _ban_sets.setdefault(tok, {})
        if opener in per_tok:
            return per_tok[opener]
    texts = [b"" if tok.is_special(i) else tok.token_bytes(i) for i in range(tok.vocab_size)]
    op = opener.encode("utf-8")
    sets = [torch.tensor([i for i, b in enumerate(texts) if op in b], dtype=torch.long)]
    for k in range(1, len(op)):
        rest = op[k:]
        sets.append(torch.tensor([i for i, b in enumerate(texts) if b.startswith(rest) or op in b],
                                 dtype=torch.long))
    with _ban_lock:
        per_tok[opener] = sets
    return sets


class OpenerBan:
    """tool_choice "none": the call opener can never appear."""

    def __init__(self, tok, syntax: ToolSyntax):
        self.tok = tok
        self.opener = syntax.trigger if not syntax.start_only else None
        self._id = tok.special_tokens.get(syntax.opener) if syntax.opener_is_control else None
        self._sets = _completing_ids(tok, self.opener) if self.opener and self._id is None else None
        self._text = _Text(tok)

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if self._id is not None:
            if self._id < logits.shape[-1]:
                logits[self._id] = float("-inf")
            return logits
        if self._sets is None:
            return logits
        self._text.advance(token_ids)
        text = self._text.text[-len(self.opener):]
        banned = [self._sets[0]] + [self._sets[k] for k in range(1, len(self.opener))
                                    if text.endswith(self.opener[:k])]
        ids = torch.cat(banned) if len(banned) > 1 else banned[0]
        if ids.numel():
            logits[ids[ids < logits.shape[-1]]] = float("-inf")
        return logits
