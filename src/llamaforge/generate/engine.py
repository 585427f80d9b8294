"""The continuous-batching generation core.

`BatchEngine` owns one preallocated KV cache with `max_batch` rows. Requests wait in a queue, get a free row,
are prefilled in chunks (so a long prompt delays the others by at most one chunk per step), then decode together:
every `step()` feeds the last sampled token of every active row in one batched forward with per-row positions.
One thread drives the engine (`step()`); `add()` and `cancel()` may be called from other threads.

Text comes out as deltas that never split a UTF-8 character and never leak a stop string: text that could still
be the beginning of a stop string is held back until it is clearly not one.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Sequence

import torch

from ..errors import ContextLengthError, InvalidRequestError
from ..model.llama import ATTENTION_BLOCK
from ..model.quant import dense_matmuls, dense_rows_invariant
from . import compiled
from .prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache, common_prefix
from .sampling import LogitsProcessor, Sampler, SamplingParams, check_token_ids
from .speculative import make_speculator

DEFAULT_MAX_SEQ_LEN = 4096
# Prompt tokens per forward: 256 is faster than 512 on CPU (the activations stay in cache; bench/NOTES.md) and
# lowers the memory peak of a long prompt; each step's budget, so decoding rows wait at most one chunk.
DEFAULT_PREFILL_CHUNK = 256

# Determinism (the same tokens alone or batched, streamed or not, first or repeated): the model's kernels give
# a row the same numbers whatever else is in the batch (packed matmuls are row-independent, decode attention
# runs per row, prompt attention in ATTENTION_BLOCK-aligned blocks; model/llama.py). What remains is to never
# let the schedule change which positions are computed together: prefill chunks end on an aligned grid, and
# reused keys/values stop on it and come only from prompt prefills (a position computed by decode is rounded
# differently from the same position computed by prefill).
#
# Dense prefill: a prompt of at least DENSE_PREFILL_TOKENS tokens is prefilled with float32 GEMMs over the int4
# weights dequantized per forward (model/quant.py; 1.2-1.5x faster prefill, bench/NOTES.md, but a fixed
# dequantization cost that short prompts would not earn back). Whether a prompt takes it depends only on the
# prompt's length, every chunk of it takes it, the GEMM gives a row the same numbers whatever the chunk's size
# (probed per layer shape, `dense_rows_invariant`; chunks of fewer rows are padded) and reused keys/values come only
# from prompts that took the same path: so the tokens stay as deterministic as above. LLAMAFORGE_DENSE_PREFILL=0
# turns it off.
DENSE_PREFILL_TOKENS = 128


class TokenEvent(NamedTuple):
    """One generated token.

    id: the token id. text: the text delta to show after this token ("" while text is held back or for
    control tokens). logprob: the token's log-probability under the model (before sampling filters).
    top_logprobs: [(id, logprob), ...] most likely first when `SamplingParams.logprobs` is set, else None.
    finish_reason: None while generating; "stop" (a stop id or string) or "length" (max_tokens or the context
    window) on the request's last event. A stop token's own event has finish_reason "stop" and is not part
    of the completion's token_ids.
    """

    id: int
    text: str
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None


def model_options(lm) -> dict:
    """The generation options stored with a model (`create --param`, Modelfile PARAMETER), or {}."""
    opts = (getattr(lm, "defaults", None) or {}).get("options")
    return opts if isinstance(opts, dict) else {}


def context_length(lm) -> int:
    """The model's context window: GGUF/HF metadata if present, else the config's max_position_embeddings; a
    stored `num_ctx` (Modelfile PARAMETER num_ctx, as in Ollama) makes it smaller, never larger."""
    n = (getattr(lm, "metadata", None) or {}).get("context_length")
    try:
        n = int(n)
    except (TypeError, ValueError):
        n = 0
    n = n if n > 0 else int(lm.config.max_position_embeddings)
    num_ctx = model_options(lm).get("num_ctx")
    if isinstance(num_ctx, int) and not isinstance(num_ctx, bool) and num_ctx >= 2:
        n = min(n, num_ctx)
    return n


@dataclass(eq=False)
class Request:
    """A generation request inside a `BatchEngine`. Read its fields; do not modify them.

    `output_ids` are the generated tokens (stop tokens excluded), `text` the text emitted so far,
    `completion_tokens` every token sampled (a final stop token included), `finish_reason` once `done`.
    `user_data` is free for the caller (the server keeps its stream handle there).
    """

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    stop_ids: frozenset[int]
    user_data: Any = None
    state: str = "queued"            # queued -> prefill -> decode -> done
    dense: bool = False              # prefilled by dense GEMMs (see DENSE_PREFILL_TOKENS)
    row: int | None = None
    pos: int = 0                     # tokens already written to the cache
    output_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0           # prompt tokens whose keys/values were reused from a previous request
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    t_added: float = field(default_factory=time.perf_counter)
    t_prefill_start: float | None = None
    t_first_token: float | None = None
    t_done: float | None = None
    _next_token: int | None = None   # sampled, not yet fed to the model
    _all_ids: list[int] = field(default_factory=list)
    _text: Any = None                # _TextState

    @property
    def done(self) -> bool:
        return self.state == "done"

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    @property
    def prompt_seconds(self) -> float:
        """Wall time from the start of prefill to the first token (0 until then)."""
        if self.t_prefill_start is None or self.t_first_token is None:
            return 0.0
        return self.t_first_token - self.t_prefill_start

    @property
    def decode_seconds(self) -> float:
        """Wall time from the first token to the last (0 until done)."""
        if self.t_first_token is None or self.t_done is None:
            return 0.0
        return self.t_done - self.t_first_token


class _TextState:
    """Incremental detokenisation plus stop-string hold-back for one request."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stops: Sequence[str]):
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        if self.decoder is not None:
            # Prime with the prompt: the first generated token continues the prompt's text (SentencePiece
            # models must keep its leading space), and a character split across the boundary decodes whole.
            for i in prompt_ids:
                self.decoder.feed(i)
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text safe to emit, hit_stop_string)."""
        if self.decoder is None:
            return "", False
        self.pending += self.decoder.feed(token_id)
        return self._release(final=False)

    def finish(self) -> tuple[str, bool]:
        """Generation ended: release everything still held (up to a stop string, if one completes now)."""
        if self.decoder is not None:
            self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        text = self.pending
        if not self.stops:
            self.pending = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return text[:cut], True
        if final:
            self.pending = ""
            return text, False
        hold = _held_suffix(text, self.stops)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class BatchEngine:
    """Continuous batching over one KV cache.

        engine = BatchEngine(lm, max_batch=4, max_seq_len=4096)
        req = engine.add(prompt_ids, SamplingParams(max_tokens=32, temperature=0))
        while engine.has_work():
            for r, event in engine.step():
                print(event.text, end="")

    lm: a `LoadedModel` (config, model, tokenizer). max_seq_len: tokens per row = the context window requests
    get here (default: the model's context, at most 4096; the cache costs 2 * layers * kv_heads * head_dim *
    max_batch * max_seq_len values). prefill_chunk: prompt tokens processed per step. prefix_cache_bytes: memory
    for prompt-prefix keys/values kept across requests (`PrefixCache`; 0 turns it off; rows that still hold a
    finished request's prompt are reused either way).
    speculate: "off" (default), "ngram" (prompt-lookup drafts) or "draft" (drafts from `draft_lm`, a smaller
    model with the same tokenizer); draft_tokens: tokens drafted per row and step (generate/speculative.py;
    the output is the same as without speculation, token for token).
    """

    def __init__(self, lm, max_batch: int = 4, max_seq_len: int | None = None, *,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 speculate: str | None = None, draft_tokens: int | None = None, draft_lm=None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_seq_len is None:
            max_seq_len = min(context_length(lm), DEFAULT_MAX_SEQ_LEN)
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.vocab_size = int(lm.config.vocab_size)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.device = next(self.model.parameters()).device
        self.cache = self.model.new_cache(max_batch, max_seq_len)
        # Reused prompt prefixes are whole multiples of this many tokens (the prefix cache's block size).
        self.reuse_unit = math.lcm(self.chunk_unit, ATTENTION_BLOCK)
        self.prefix_cache = PrefixCache(self.reuse_unit, prefix_cache_bytes)
        self._rows: list[Request | None] = [None] * max_batch
        self._row_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # what each free row's cache holds
        self._row_dense = [False] * max_batch                                 # ... and by which prefill path
        self.dense_prefill_tokens = DENSE_PREFILL_TOKENS if dense_prefill_allowed(self.model, self.device) \
            else None
        self._queue: list[Request] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stepping = False
        base = getattr(self.tokenizer, "stop_ids", None) if self.tokenizer is not None else None
        self._tokenizer_stop_ids = frozenset(base or ())
        self.speculator = make_speculator(self, speculate, draft_tokens, draft_lm)

    # -- queue management -------------------------------------------------------------------------------------

    @property
    def chunk_unit(self) -> int:
        """Prefill chunks end on multiples of this (or at the prompt's end), whatever the step's budget."""
        return ATTENTION_BLOCK if self.prefill_chunk >= ATTENTION_BLOCK else self.prefill_chunk

    @property
    def context_length(self) -> int:
        return self.max_seq_len

    @property
    def active(self) -> int:
        """Requests holding a cache row (prefilling or decoding)."""
        return sum(r is not None for r in self._rows)

    @property
    def queued(self) -> int:
        """Requests waiting for a free row."""
        return len(self._queue)

    def has_work(self) -> bool:
        return bool(self._queue) or any(r is not None for r in self._rows)

    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
            logits_processors: Iterable[LogitsProcessor] | None = None, *, user_data: Any = None) -> Request:
        """Queue a request. Raises InvalidRequestError for bad params or token ids, ContextLengthError
        (with both counts) when the prompt leaves no room to generate in this engine's context window."""
        params = (params or SamplingParams()).validate()
        ids = check_token_ids(prompt_ids, self.vocab_size)
        for what, named in (("stop_ids", params.stop_ids), ("logit_bias", [i for i, _ in params.logit_bias])):
            bad = next((i for i in named if i >= self.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(f"token id {bad} in {what} is outside the vocabulary (size "
                                          f"{self.vocab_size})", field=what)
        if len(ids) >= self.max_seq_len:
            raise ContextLengthError(len(ids), self.max_seq_len)
        stop_ids = frozenset(params.stop_ids) | (frozenset() if params.ignore_eos else self._tokenizer_stop_ids)
        req = Request(id=next(self._ids), prompt_ids=ids, params=params,
                      sampler=Sampler(params, logits_processors), stop_ids=stop_ids, user_data=user_data)
        req._all_ids = list(ids)
        req._text = _TextState(self.tokenizer, ids, params.stop)
        with self._lock:
            self._queue.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request. Its row is free before the next step; it produces no further events."""
        with self._lock:
            if req.done:
                return
            req.cancelled = True
            if req in self._queue:
                self._queue.remove(req)
                self._finish(req, None)
            elif not self._stepping:
                self._release_row(req)
                self._finish(req, None)

    def _release_row(self, req: Request) -> None:
        if req.row is not None and self._rows[req.row] is req:
            self._rows[req.row] = None
            # Remember the prompt tokens this row prefilled, so a later prompt with the same prefix skips
            # recomputing them (generated tokens' keys came from decode steps and are not reused: determinism).
            self._row_tokens[req.row] = req.prompt_ids[:min(req.pos, len(req.prompt_ids))]
            self._row_dense[req.row] = req.dense
            self.cache.reset(req.row)
        req.row = None

    def _finish(self, req: Request, reason: str | None) -> None:
        req.state = "done"
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        self._release_row(req)

    def _admit(self) -> None:
        with self._lock:
            while self._queue:
                free = [r for r in range(self.max_batch) if self._rows[r] is None]
                if not free:
                    break
                req = self._queue.pop(0)
                req.dense = self.dense_prefill_tokens is not None and len(req.prompt_ids) >= \
                    self.dense_prefill_tokens
                # The free row whose cached tokens share the longest prefix with this prompt (prefix reuse),
                # among rows whose keys/values came from the same prefill path.
                shared = {r: common_prefix(self._row_tokens[r], req.prompt_ids)
                          if self._row_dense[r] == req.dense else 0 for r in free}
                row = max(free, key=lambda r: (shared[r], -r))
                # At least the last prompt token is recomputed: its logits give the first new token. Reuse stops
                # on the aligned grid, so the rest is prefilled in the same blocks as in a fresh run.
                limit = len(req.prompt_ids) - 1
                reuse = min(shared[row], limit) // self.reuse_unit * self.reuse_unit
                # The row's old prompt blocks are about to be overwritten: keep them in the shared cache first
                # (a row's own prefix costs no copy while the row still holds it).
                old = self._row_tokens[row]
                if len(old) >= reuse + self.reuse_unit:
                    self.prefix_cache.store(old, self.cache, row, len(old), _salt(self._row_dense[row]))
                blocks = self.prefix_cache.lookup(req.prompt_ids, limit, _salt(req.dense))
                if len(blocks) * self.reuse_unit > reuse:  # the shared cache holds more of this prefix
                    self.prefix_cache.load_into(blocks, self.cache, row, reuse // self.reuse_unit, self.reuse_unit)
                    reuse = len(blocks) * self.reuse_unit
                self.prefix_cache.count_hit(reuse)
                req.row, req.state, req.pos, req.cached_tokens = row, "prefill", reuse, reuse
                self._row_tokens[row] = []
                self.cache.lengths[row] = reuse
                self._rows[row] = req

    def _reap_cancelled(self) -> None:
        with self._lock:
            for req in self._rows:
                if req is not None and req.cancelled:
                    self._finish(req, None)

    # -- the step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, TokenEvent]]:
        """Prefill newcomers (one chunk budget per step) and decode one token for every active row.

        Returns the events produced: first tokens of requests whose prefill completed, then one per decoding row
        (in row order). A request's last event carries its finish_reason; cancelled requests produce none.
        """
        self._reap_cancelled()
        self._admit()
        with self._lock:
            self._stepping = True
        try:
            events: list[tuple[Request, TokenEvent]] = []
            decoding = [r for r in self._rows if r is not None and r.state == "decode"]
            self._prefill(events)
            if decoding:
                self._decode(decoding, events)
        finally:
            with self._lock:
                self._stepping = False
        self._reap_cancelled()
        return [(r, e) for r, e in events if not r.cancelled]

    def _prefill(self, events: list) -> None:
        budget = self.prefill_chunk
        for req in sorted((r for r in self._rows if r is not None and r.state == "prefill"), key=lambda r: r.id):
            if budget <= 0:
                break
            if req.t_prefill_start is None:
                req.t_prefill_start = time.perf_counter()
            n = min(budget, len(req.prompt_ids) - req.pos)
            if req.pos + n < len(req.prompt_ids):  # not the last chunk: end it on the grid
                n = (req.pos + n) // self.chunk_unit * self.chunk_unit - req.pos
                if n <= 0:
                    break
            chunk = torch.tensor([req.prompt_ids[req.pos:req.pos + n]], dtype=torch.long, device=self.device)
            rows = None if req.row == 0 else torch.tensor([req.row], device=self.device)
            with dense_matmuls(1) if req.dense else contextlib.nullcontext():
                logits = self.model(chunk, cache=self.cache, input_pos=req.pos, rows=rows, last_only=True)
            req.pos += n
            self.cache.lengths[req.row] = req.pos
            budget -= n
            if req.pos == len(req.prompt_ids):
                req.state = "decode"
                req.t_first_token = time.perf_counter()
                self._emit(req, logits[0, -1], events)

    def _decode(self, batch: list[Request], events: list) -> None:
        batch = [r for r in batch if not r.cancelled and r.state == "decode"]
        if not batch:
            return
        batch.sort(key=lambda r: r.row)
        if self.speculator is not None:  # eager verify path; every step of these rows takes it (same kernels)
            self.speculator.decode(batch, events)
            return
        logits = None
        if compiled.current(self.lm) is not None:  # the AOT-compiled steps (generate/compiled.py) when built
            if len(batch) == 1:
                req = batch[0]
                logits = compiled.decode_one(self.lm, req._next_token, self.cache, req.pos, req.row)[None]
            else:
                logits = compiled.decode_batch(self.lm, [r._next_token for r in batch], self.cache,
                                               [r.pos for r in batch], [r.row for r in batch])
        if logits is not None:
            for i, req in enumerate(batch):
                req.pos += 1
                self.cache.lengths[req.row] = req.pos
                self._emit(req, logits[i], events)
            return
        ids = torch.tensor([[r._next_token] for r in batch], dtype=torch.long, device=self.device)
        pos = torch.tensor([r.pos for r in batch], dtype=torch.long, device=self.device)
        row_list = [r.row for r in batch]
        # Rows 0..B-1 in order let the cache hand out views instead of gathered copies.
        rows = None if row_list == list(range(len(batch))) else torch.tensor(row_list, device=self.device)
        logits = self.model(ids, cache=self.cache, input_pos=pos, rows=rows, last_only=True)  # [B, 1, V]
        logits = logits[:, -1].float().cpu()  # one device->host copy per step; sampling runs on the CPU
        for i, req in enumerate(batch):
            req.pos += 1
            self.cache.lengths[req.row] = req.pos
            self._emit(req, logits[i], events)

    def _emit(self, req: Request, logits: torch.Tensor, events: list) -> int:
        """Sample the next token for `req` and turn it into an event (finishing the request if it ends);
        returns the sampled token id."""
        s = req.sampler(logits, req._all_ids)
        req.completion_tokens += 1
        tok = s.id
        if tok in req.stop_ids:
            text, _ = req._text.finish()
            self._done_event(req, tok, s, text, "stop", events)
            return tok
        req.output_ids.append(tok)
        req._all_ids.append(tok)
        text, hit = req._text.feed(tok)
        if hit:
            self._done_event(req, tok, s, text, "stop", events)
            return tok
        # The sampled token would be fed at position req.pos; it must still fit in the row.
        if req.completion_tokens >= req.params.max_tokens or req.pos + 1 >= self.max_seq_len:
            rest, hit = req._text.finish()
            self._done_event(req, tok, s, text + rest, "stop" if hit else "length", events)
            return tok
        req._next_token = tok
        req.text += text
        events.append((req, TokenEvent(tok, text, s.logprob, s.top_logprobs, None)))
        return tok

    def _done_event(self, req, tok, s, text, reason, events) -> None:
        req.text += text
        with self._lock:
            self._finish(req, reason)
        events.append((req, TokenEvent(tok, text, s.logprob, s.top_logprobs, reason)))


def _salt(dense: bool) -> bytes:
    return b"dense-prefill" if dense else b""


def dense_prefill_allowed(model, device) -> bool:
    """Whether prompts of DENSE_PREFILL_TOKENS or more are prefilled by dense GEMMs on `model` (see the top)."""
    if os.environ.get("LLAMAFORGE_DENSE_PREFILL", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return torch.device(device).type == "cpu" and dense_rows_invariant(model)


@torch.inference_mode()
def prompt_logprobs(lm, prompt_ids: Sequence[int], top_n: int = 0, *, chunk: int = DEFAULT_PREFILL_CHUNK
                    ) -> list[tuple[float | None, list[tuple[int, float]] | None]]:
    """Log-probability of every prompt token given the ones before it (for OpenAI `echo` + `logprobs`,
    perplexity and multiple-choice scoring).

    Returns one (logprob, top) pair per prompt token; the first token has (None, None). `top` lists the
    `top_n` most likely tokens at that position as (id, logprob), or None when top_n is 0.
    """
    ids = check_token_ids(prompt_ids, int(lm.config.vocab_size))
    ctx = context_length(lm)
    if len(ids) > ctx:
        raise ContextLengthError(len(ids), ctx)
    if not 0 <= int(top_n) <= 20:
        raise InvalidRequestError(f"logprobs must be between 0 and 20, got {top_n}", field="logprobs")
    model = lm.model
    device = next(model.parameters()).device
    cache = model.new_cache(1, len(ids))
    out: list[tuple[float | None, list[tuple[int, float]] | None]] = [(None, None)]
    for start in range(0, len(ids), chunk):
        piece = ids[start:start + chunk]
        with dense_matmuls():  # this cache is scored and dropped, never decoded from
            logits = model(torch.tensor([piece], device=device), cache=cache, input_pos=start)[0]  # [T, V]
        lp = torch.log_softmax(logits.float(), dim=-1).cpu()
        targets = ids[start + 1:start + 1 + len(piece)]
        chosen = lp[torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)] if targets else None
        if top_n:
            tv, ti = torch.topk(lp[:len(targets)], int(top_n), dim=-1)
        for j in range(len(targets)):
            top = [(int(a), float(b)) for a, b in zip(ti[j].tolist(), tv[j].tolist())] if top_n else None
            out.append((float(chosen[j]), top))
    return out
