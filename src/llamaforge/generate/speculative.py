"""Speculative decoding for `BatchEngine`: draft a few tokens per row cheaply, verify them in one target forward.

Drafters:
  * `PromptLookup` (n-gram / prompt-lookup decoding): the last n tokens of a row (n = max_ngram..1) are looked
    up earlier in its prompt + output; the tokens that followed the most recent earlier occurrence are the draft.
    Free to compute, and good wherever the answer copies its input (editing code, quoting, summarising).
  * `DraftModel`: a smaller Llama with the same vocabulary proposes k tokens greedily, with its own KV cache
    row per engine row (kept in step with what the target accepted).

Verification is exact. Each row feeds its last token and its k draft tokens as k+1 one-token "virtual rows" of
one batched decode forward (the same cache row repeated at consecutive positions): the cache writes every new
key before any attention reads, so the token at position p+i sees the drafts before it, and every position is
computed by the very kernels a plain decode step uses (one query per attention call over exactly its own keys;
row-independent matmuls; model/llama.py), so its logits are bit-identical to plain decoding's. The row's own
sampler then picks tokens position by position with the true history (processors, penalties, logprobs and
seeded sampling see exactly the calls plain decoding makes); a draft token is accepted while the picked token
equals it, and the first picked token that differs is emitted as the correction. With sampling, "sample from
the target, accept if equal" is speculative sampling for a one-point draft distribution: the output is the
target's distribution, and even the same tokens for the same seed. Keys/values written for rejected drafts
are left behind the row's length, which is all a rollback needs (attention only reads keys below a position).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InvalidRequestError
from .prefix_cache import common_prefix

SPECULATE_MODES = ("off", "ngram", "draft")
DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16
DEFAULT_MAX_NGRAM = 3


class NgramIndex:
    """Where each n-gram (n = 1..max_n) of a growing token list last ended, updated incrementally."""

    def __init__(self, max_n: int):
        self.max_n = max_n
        self.last_end: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending at positions (exclusive) <= this are in the index

    def propose(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest matching suffix."""
        L = len(ids)
        # Index every n-gram that ends before the current end (the suffix itself must not match itself).
        for end in range(self.indexed + 1, L):
            for n in range(1, min(self.max_n, end) + 1):
                self.last_end[tuple(ids[end - n:end])] = end
        self.indexed = max(self.indexed, L - 1)
        for n in range(min(self.max_n, L), 0, -1):
            end = self.last_end.get(tuple(ids[L - n:]))
            if end is not None:
                return list(ids[end:min(end + k, L)])
        return []


class PromptLookup:
    """Prompt-lookup drafting; one `NgramIndex` per request."""

    name = "ngram"

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM):
        self.max_ngram = max_ngram
        self._index: dict[int, tuple[object, NgramIndex]] = {}  # engine row -> (request, its index)

    def propose(self, req, k: int) -> list[int]:
        held = self._index.get(req.row)
        if held is None or held[0] is not req:
            held = (req, NgramIndex(self.max_ngram))
            self._index[req.row] = held
        return held[1].propose(req._all_ids, k)

    def accepted(self, req, n_ids: int) -> None:
        """The row's tokens now number `n_ids` (nothing to undo: the index only grows with accepted tokens)."""


class DraftModel:
    """Greedy drafts from a smaller model with the target's vocabulary; its cache has one row per engine row."""

    name = "draft"

    def __init__(self, draft_lm, max_batch: int, max_seq_len: int, *, prefill_chunk: int = 256):
        self.lm = draft_lm
        self.model = draft_lm.model
        self.device = next(self.model.parameters()).device
        self.cache = self.model.new_cache(max_batch, max_seq_len)
        self.prefill_chunk = prefill_chunk
        # engine row -> (request, tokens whose keys/values the draft cache holds for it, in order)
        self._rows: dict[int, tuple[object, list[int]]] = {}

    def _forward(self, ids: list[int], pos: int, row: int) -> torch.Tensor:
        rows = None if row == 0 else torch.tensor([row], device=self.device)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x, cache=self.cache, input_pos=pos, rows=rows, last_only=True)[0, -1]

    @torch.inference_mode()
    def propose(self, req, k: int) -> list[int]:
        ids = req._all_ids
        held = self._rows.get(req.row)
        have = held[1] if held is not None and held[0] is req else []
        valid = common_prefix(have, ids)
        valid = min(valid, len(ids) - 1)  # the last token is fed now: its logits give the first draft
        logits = None
        while valid < len(ids):  # catch up with what the target accepted (the prompt, at first)
            piece = ids[valid:valid + self.prefill_chunk]
            logits = self._forward(piece, valid, req.row)
            valid += len(piece)
        cached = list(ids)
        draft: list[int] = []
        while True:
            tok = int(torch.argmax(logits.float()))
            draft.append(tok)
            if len(draft) >= k or len(cached) + 1 >= self.cache.max_seq_len:
                break
            logits = self._forward([tok], len(cached), req.row)
            cached.append(tok)
        self._rows[req.row] = (req, cached)
        return draft

    def accepted(self, req, n_ids: int) -> None:
        held = self._rows.get(req.row)
        if held is not None and held[0] is req:
            del held[1][n_ids:]


def check_draft_vocabulary(target_lm, draft_lm) -> None:
    """Refuse a draft model whose tokenizer is not the target's (its token ids would mean other text)."""
    t, d = target_lm.tokenizer, draft_lm.tokenizer
    tv, dv = int(target_lm.config.vocab_size), int(draft_lm.config.vocab_size)
    if t is None or d is None:
        raise InvalidRequestError("a draft model needs a tokenizer on both models to check that they share "
                                  "one vocabulary", field="draft")
    if t.vocab_size != d.vocab_size or tv != dv:
        raise InvalidRequestError(f"the draft model's vocabulary ({d.vocab_size} tokens, {dv} logits) differs "
                                  f"from the target's ({t.vocab_size} tokens, {tv} logits); a draft must use "
                                  "the same tokenizer", field="draft")
    for i in range(t.vocab_size):
        if t.token_bytes(i) != d.token_bytes(i) or t.is_special(i) != d.is_special(i):
            raise InvalidRequestError(f"the draft model's tokenizer differs from the target's at token {i} "
                                      f"({t.id_to_piece(i)!r} vs {d.id_to_piece(i)!r}); a draft must use the same "
                                      "tokenizer", field="draft")


class Speculator:
    """Decode step with drafting and exact verification for a `BatchEngine` (see the module docstring)."""

    def __init__(self, engine, drafter, draft_tokens: int = DEFAULT_DRAFT_TOKENS):
        _check_k(draft_tokens)
        self.engine = engine
        self.drafter = drafter
        self.k = draft_tokens
        # Draft length per request, adapted to how well its drafts do: +2 after a fully accepted draft, -1
        # after a rejection (a rejected token costs a row of the verify forward and returns nothing).
        self._k_of: dict[int, int] = {}
        self.steps = 0          # row-steps that verified a draft
        self.drafted = 0        # draft tokens proposed and verified
        self.accepted = 0       # draft tokens the target agreed with

    def stats(self) -> dict:
        return {"mode": self.drafter.name, "draft_tokens": self.k, "verify_steps": self.steps,
                "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0}

    def _budget(self, req) -> int:
        """Most draft tokens worth verifying: every emitted token must fit the row and the request's budget."""
        room = self.engine.max_seq_len - 1 - req.pos            # positions pos..pos+k must exist
        left = req.params.max_tokens - req.completion_tokens - 1  # k accepted + 1 more would be all of it
        return max(0, min(self._k_of.get(req.id, self.k), room, left))

    def decode(self, batch: list, events: list) -> None:
        """One step for every row of `batch`: verify each row's draft (or plain-decode a row without one)."""
        eng = self.engine
        if len(self._k_of) > 4 * eng.max_batch:  # requests cancelled mid-generation leave entries behind
            live = {r.id for r in batch}
            self._k_of = {i: k for i, k in self._k_of.items() if i in live}
        drafts = []
        tokens, positions, rows = [], [], []
        for req in batch:
            k = self._budget(req)
            draft = self.drafter.propose(req, k)[:k] if k > 0 else []
            drafts.append(draft)
            feed = [req._next_token] + draft
            tokens += feed
            positions += range(req.pos, req.pos + len(feed))
            rows += [req.row] * len(feed)
        ids = torch.tensor(tokens, dtype=torch.long, device=eng.device)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=eng.device)
        row_t = None if rows == list(range(len(rows))) else torch.tensor(rows, device=eng.device)
        logits = eng.model(ids, cache=eng.cache, input_pos=pos, rows=row_t, last_only=True)[:, -1].float().cpu()
        at = 0
        for req, draft in zip(batch, drafts):
            base, good = req.pos, 0
            for i in range(len(draft) + 1):
                req.pos = base + i + 1
                eng.cache.lengths[req.row] = req.pos
                tok = eng._emit(req, logits[at + i], events)
                if req.done or i == len(draft) or tok != draft[i]:
                    break
                good += 1
            if draft:
                self.steps += 1
                self.drafted += len(draft)
                self.accepted += good
                k = self._k_of.get(req.id, self.k)
                self._k_of[req.id] = min(self.k, k + 2) if good == len(draft) else max(1, k - 1)
            if req.done:
                self._k_of.pop(req.id, None)
            else:
                self.drafter.accepted(req, len(req._all_ids) - 1)  # the last token is not in the cache yet
            at += len(draft) + 1


def configure(lm, speculate: str | None = None, draft_tokens: int | None = None, draft_lm=None) -> None:
    """Make every engine later built for `lm` speculate (the CLI's --speculate / --draft / --draft-tokens).

    Checks the options now (unknown mode, draft tokens out of range, a draft model with another tokenizer:
    InvalidRequestError) so a bad flag fails at start-up, not at the first request."""
    mode = _mode(speculate, draft_lm)
    _draft_tokens(draft_tokens)
    if mode == "draft":
        check_draft_vocabulary(lm, draft_lm)
    lm.__dict__["speculation"] = {"speculate": mode, "draft_tokens": draft_tokens, "draft_lm": draft_lm}


def check_options(speculate: str | None, draft_tokens: int | None, *, has_draft: bool) -> None:
    """The checks `configure` makes, before any model is loaded (serve fails at start-up)."""
    _mode(speculate, object() if has_draft else None)
    _draft_tokens(draft_tokens)


def _mode(speculate, draft_lm) -> str:
    mode = speculate or ("draft" if draft_lm is not None else "off")
    if mode not in SPECULATE_MODES:
        raise InvalidRequestError(f"speculate must be one of {', '.join(SPECULATE_MODES)}, got {mode!r}",
                                  field="speculate")
    if draft_lm is not None and mode != "draft":
        raise InvalidRequestError(f"a draft model is only used with speculate 'draft', not {mode!r}",
                                  field="speculate")
    if mode == "draft" and draft_lm is None:
        raise InvalidRequestError("speculate 'draft' needs a draft model (--draft MODEL)", field="draft")
    return mode


def _check_k(k) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise InvalidRequestError(f"draft tokens must be an integer in 1..{MAX_DRAFT_TOKENS}, got {k!r}",
                                  field="draft_tokens")


def _draft_tokens(draft_tokens: int | None) -> int:
    """The draft length to use (the default when None), checked."""
    k = DEFAULT_DRAFT_TOKENS if draft_tokens is None else draft_tokens
    _check_k(k)
    return k


def make_speculator(engine, speculate: str | None, draft_tokens: int | None, draft_lm=None) -> Speculator | None:
    """The engine's speculator for `speculate` ("off", "ngram" or "draft" with `draft_lm`), or None for off.
    With no option given, the model's own setting (`configure`) applies."""
    if speculate is None and draft_tokens is None and draft_lm is None:
        held = getattr(engine.lm, "speculation", None) or {}
        speculate, draft_tokens, draft_lm = held.get("speculate"), held.get("draft_tokens"), held.get("draft_lm")
    mode = _mode(speculate, draft_lm)
    k = _draft_tokens(draft_tokens)
    if mode == "off":
        return None
    if mode == "ngram":
        return Speculator(engine, PromptLookup(), k)
    check_draft_vocabulary(engine.lm, draft_lm)
    return Speculator(engine, DraftModel(draft_lm, engine.max_batch, engine.max_seq_len), k)
