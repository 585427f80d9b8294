"""The Python generation API: `generate`, `stream` and `chat` (also available as `LoadedModel` methods).

    import llamaforge
    m = llamaforge.load("smollm2")
    out = m.generate("The capital of France is", max_tokens=16, temperature=0)
    print(out.text, out.finish_reason, out.usage)
    for event in m.stream("Once upon a time", max_tokens=32, seed=42):
        print(event.text, end="", flush=True)
    reply = m.chat([{"role": "user", "content": "Name three colours."}], temperature=0)
    print(reply.text)

Sampling keyword arguments are the fields of `SamplingParams`: max_tokens, temperature, top_k, top_p, min_p,
repeat_penalty, presence_penalty, frequency_penalty, repeat_last_n, seed, stop, stop_ids, logprobs, ignore_eos.
Options stored with the model (`llamaforge create NAME --param temperature=0.2`) are the defaults; explicit
arguments win. Bad values raise `InvalidRequestError` naming the field; a prompt that does not fit the context
raises `ContextLengthError` with both counts. Pass `logits_processors=[fn, ...]` (fn(token_ids, logits) ->
logits) to steer decoding.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from ..errors import ContextLengthError, InvalidRequestError, TokenizerError
from .engine import BatchEngine, Request, TokenEvent, context_length
from .sampling import LogitsProcessor, SamplingParams, params_from_options

# Single-request engines are sized to the request (rounded up) rather than the whole context, and reused.
_CACHE_ROUND = 256
_engine_lock = threading.Lock()


@dataclass
class Completion:
    """The result of `generate` / `chat`.

    text: the generated text (a stop string and everything after it removed).
    token_ids: the generated token ids (a final stop token excluded).
    finish_reason: "stop" (stop token or string) or "length" (max_tokens or the context window).
    usage: {"prompt_tokens", "completion_tokens", "total_tokens"}; completion_tokens counts every sampled
    token, a final stop token included.
    logprobs: per generated token (id, logprob, top_logprobs) when `logprobs=` was given, else None.
    timings: {"prompt_seconds", "decode_seconds"} (prefill until the first token, then the rest).
    cached_tokens: prompt tokens whose keys/values were reused from the previous call (a chat's earlier turns).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int]
    logprobs: list[tuple[int, float, list[tuple[int, float]] | None]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0


class TokenStream:
    """Iterator of `TokenEvent`s for one request (what `stream()` returns).

    After the last event, `completion` holds the full `Completion`. Breaking out of the loop early and calling
    `close()` (or letting the stream be garbage-collected) cancels the request.
    """

    def __init__(self, lm, prompt_ids: list[int], params: SamplingParams,
                 processors: Iterable[LogitsProcessor] | None):
        self._lm = lm
        self._closed = True  # until the request is queued, there is nothing to close
        self._engine = _checkout_engine(lm, len(prompt_ids) + params.max_tokens)
        try:
            self.request: Request = self._engine.add(prompt_ids, params, processors)
        except BaseException:
            _return_engine(lm, self._engine)
            raise
        self.completion: Completion | None = None
        # Set from anywhere (a signal handler included) to stop at the next step boundary, mid-prefill too.
        self.stop_requested = False
        self._logprobs: list | None = [] if params.logprobs is not None else None
        self._closed = False

    def __iter__(self) -> Iterator[TokenEvent]:
        req, engine = self.request, self._engine
        try:
            while not req.done and not self._closed and not self.stop_requested:
                for r, ev in engine.step():
                    if r is req:
                        if self._logprobs is not None:
                            self._logprobs.append((ev.id, ev.logprob, ev.top_logprobs))
                        yield ev
            if req.done and not req.cancelled:
                self.completion = _completion(req, self._logprobs)
        finally:
            self.close()

    def close(self) -> None:
        """Stop generating (if still running) and give the engine back."""
        if self._closed:
            return
        self._closed = True
        if not self.request.done:
            self._engine.cancel(self.request)
        _return_engine(self._lm, self._engine)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def generate(lm, prompt: str | Sequence[int], *, logits_processors: Iterable[LogitsProcessor] | None = None,
             **sampling) -> Completion:
    """Complete a raw prompt (no chat template) and return a `Completion`.

    prompt: text (encoded with the model's BOS/EOS conventions, special-token text treated as plain text) or a
    list of token ids used as is.
    """
    s = stream(lm, prompt, logits_processors=logits_processors, **sampling)
    for _ in s:
        pass
    return s.completion


def stream(lm, prompt: str | Sequence[int], *, logits_processors: Iterable[LogitsProcessor] | None = None,
           **sampling) -> TokenStream:
    """Like `generate`, but returns a `TokenStream` yielding one `TokenEvent` per token as it is produced.

    Joining the events' `text` gives exactly the completion's text. Arguments are validated immediately.
    """
    ids = encode_prompt(lm, prompt)
    params = make_params(lm, sampling)
    _check_context(lm, ids)
    return TokenStream(lm, ids, params, logits_processors)


def chat(lm, messages: Sequence[dict], *, stream: bool = False,
         logits_processors: Iterable[LogitsProcessor] | None = None, **sampling) -> Completion | TokenStream:
    """Answer a conversation with the model's chat format.

    messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. The model's stored system
    prompt (from `llamaforge create --system`) is used when the messages have none. The chat format's
    end-of-turn ids stop generation. Returns a `Completion`, or a `TokenStream` when stream=True.
    """
    ids, params = prepare_chat(lm, messages, sampling)
    s = TokenStream(lm, ids, params, logits_processors)
    if stream:
        return s
    for _ in s:
        pass
    return s.completion


def prepare_chat(lm, messages: Sequence[dict], sampling: dict | None = None) -> tuple[list[int], SamplingParams]:
    """Token ids of the conversation (with the assistant header) and the SamplingParams to answer it with:
    model defaults (system prompt, options) applied, chat-format stop ids added. Used by `chat` and the CLI."""
    from ..tokenizer.chat import chat_format_for
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError("messages must be a list of {'role', 'content'} objects", field="messages")
    messages = list(messages)
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequestError("every message needs a string 'role' and 'content'", field="messages")
    if not messages:
        raise InvalidRequestError("messages must not be empty", field="messages")
    system = (lm.defaults or {}).get("system")
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    fmt = chat_format_for(lm.tokenizer, template=(lm.defaults or {}).get("template"))
    ids = list(fmt.encode(messages, add_generation_prompt=True))
    params = make_params(lm, dict(sampling or {}))
    # The format's end-of-turn ids stop the answer (unless ignore_eos asks to run on, as with EOS itself).
    extra = tuple(i for i in getattr(fmt, "stop_ids", ()) if i not in params.stop_ids)
    if extra and not params.ignore_eos:
        params = params.replace(stop_ids=params.stop_ids + tuple(sorted(extra)))
    _check_context(lm, ids)
    return ids, params


def make_params(lm, sampling: dict) -> SamplingParams:
    """SamplingParams from the model's stored options overridden by explicit keyword arguments."""
    opts = params_from_options((getattr(lm, "defaults", None) or {}).get("options") or {})
    opts.update(sampling)
    return SamplingParams.from_kwargs(**opts)


def encode_prompt(lm, prompt: str | Sequence[int]) -> list[int]:
    """Token ids for a raw prompt: text through the tokenizer (BOS as the model expects), ids passed through."""
    if isinstance(prompt, str):
        if lm.tokenizer is None:
            raise TokenizerError("this model has no tokenizer; pass token ids")
        ids = list(lm.tokenizer.encode(prompt, add_special=True))
    elif isinstance(prompt, bytes):
        raise InvalidRequestError("the prompt must be a str or a list of token ids, not bytes", field="prompt")
    else:
        ids = list(prompt)
    if not ids:
        raise InvalidRequestError("the prompt is empty", field="prompt")
    return ids


def _check_context(lm, ids: list[int]) -> None:
    ctx = context_length(lm)
    if len(ids) >= ctx:
        raise ContextLengthError(len(ids), ctx)


def _completion(req: Request, logprobs) -> Completion:
    return Completion(text=req.text, token_ids=list(req.output_ids), finish_reason=req.finish_reason,
                      usage=req.usage, logprobs=logprobs, cached_tokens=req.cached_tokens,
                      timings={"prompt_seconds": req.prompt_seconds, "decode_seconds": req.decode_seconds})


def _checkout_engine(lm, needed: int) -> BatchEngine:
    """A one-row engine whose context covers `needed` tokens (capped at the model's context).

    One idle engine is kept on the model object and handed to one caller at a time; concurrent callers get
    their own, so single requests never share a step loop. Reusing it also reuses its cached prompt prefix
    (a chat's earlier turns are not recomputed).
    """
    ctx = context_length(lm)
    size = min(ctx, -(-max(needed, 2) // _CACHE_ROUND) * _CACHE_ROUND)
    with _engine_lock:
        eng = lm.__dict__.pop("_single_engine", None)
    if eng is not None and eng.model is lm.model and eng.max_seq_len >= size:
        return eng
    if eng is not None:
        size = min(ctx, max(size, 2 * eng.max_seq_len))  # grow geometrically: a chat grows turn by turn
    del eng  # free the old cache before allocating a bigger one
    return BatchEngine(lm, max_batch=1, max_seq_len=size)


def _return_engine(lm, engine: BatchEngine) -> None:
    with _engine_lock:
        cur = lm.__dict__.get("_single_engine")
        if cur is None or cur.max_seq_len < engine.max_seq_len:
            lm.__dict__["_single_engine"] = engine
