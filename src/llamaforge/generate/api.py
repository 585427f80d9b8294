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

from ..errors import InvalidRequestError
from .engine import BatchEngine, Request, TokenEvent, context_length
from .pipeline import Plan, plan
from .request import Constraint, GenerationRequest, Guards, Retrieval, Tool
from .sampling import LogitsProcessor, SamplingParams
from .stage import Stage

# Single-request engines are sized to the request (rounded up) rather than the whole context, and reused.
_CACHE_ROUND = 256
DEFAULT_MAX_TOKENS = SamplingParams.max_tokens  # a Python call without max_tokens generates at most this many
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
    tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}] when the model called tools
    (finish_reason "tool_calls"). citations: passages a retrieval stage grounded the answer in. extra: other
    stage findings (guard verdicts, code-scan findings).
    """

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int]
    logprobs: list[tuple[int, float, list[tuple[int, float]] | None]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0
    tool_calls: list[dict] = field(default_factory=list)
    citations: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class TokenStream:
    """Iterator of `TokenEvent`s for one request (what `stream()` returns).

    Events carry the text after the seam's output stages (held-back text comes out later, tool-call text never
    as text). After the last event, `completion` holds the full `Completion`. Breaking out of the loop early and
    calling `close()` (or letting the stream be garbage-collected) cancels the request.
    """

    def __init__(self, lm, plan: Plan):
        self._lm = lm
        self._closed = True  # until the request is queued, there is nothing to close
        self.plan = plan
        self.request: Request | None = None
        self.completion: Completion | None = None
        # Set from anywhere (a signal handler included) to stop at the next step boundary, mid-prefill too.
        self.stop_requested = False
        self._output = plan.output()
        self._logprobs: list | None = [] if plan.params.logprobs is not None else None
        if plan.refusal is not None:
            return
        self._engine = _checkout_engine(lm, len(plan.prompt_ids) + plan.params.max_tokens)
        try:
            self.request = self._engine.add(plan.prompt_ids, plan.params, plan.processors())
        except BaseException:
            _return_engine(lm, self._engine)
            raise
        self._closed = False

    def __iter__(self) -> Iterator[TokenEvent]:
        if self.plan.refusal is not None:
            yield from self._refused()
            return
        req, engine = self.request, self._engine
        try:
            while not req.done and not self._closed and not self.stop_requested:
                for r, ev in engine.step():
                    if r is not req:
                        continue
                    if self._logprobs is not None:
                        self._logprobs.append((ev.id, ev.logprob, ev.top_logprobs))
                    text = "".join(d.text for d in self._output.feed(ev.text))
                    withheld = ev.finish_reason is None and self._output.stopped  # an output guard blocked
                    if ev.finish_reason is not None or withheld:
                        tail, result = self._output.finish(ev.finish_reason or "stop")
                        text += "".join(d.text for d in tail)
                        self.completion = _completion(req, result, self._logprobs)
                        ev = ev._replace(finish_reason=result.finish_reason)
                    yield ev._replace(text=text)
                    if withheld:
                        return  # the finally clause cancels the request
        finally:
            self.close()

    def _refused(self) -> Iterator[TokenEvent]:
        r = self.plan.refusal
        _, result = self._output.finish(r.reason)
        result.text, result.extra = r.text, dict(r.extra, **result.extra)
        n = len(self.plan.prompt_ids)
        self.completion = Completion(text=r.text, token_ids=[], finish_reason=r.reason, usage={
            "prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}, citations=result.citations,
            extra=result.extra)
        yield TokenEvent(-1, r.text, 0.0, None, r.reason)

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
             **kwargs) -> Completion:
    """Complete a raw prompt (no chat template) and return a `Completion`.

    prompt: text (encoded with the model's BOS/EOS conventions, special-token text treated as plain text) or a
    list of token ids used as is. Keyword arguments: sampling fields and the request features listed in the
    module docstring.
    """
    s = stream(lm, prompt, logits_processors=logits_processors, **kwargs)
    for _ in s:
        pass
    return s.completion


def stream(lm, prompt: str | Sequence[int], *, logits_processors: Iterable[LogitsProcessor] | None = None,
           **kwargs) -> TokenStream:
    """Like `generate`, but returns a `TokenStream` yielding one `TokenEvent` per token as it is produced.

    Joining the events' `text` gives exactly the completion's text. Arguments are validated immediately.
    """
    return TokenStream(lm, _plan(lm, build_request(prompt=prompt, **kwargs), logits_processors))


def chat(lm, messages: Sequence[dict], *, stream: bool = False,
         logits_processors: Iterable[LogitsProcessor] | None = None, **kwargs) -> Completion | TokenStream:
    """Answer a conversation with the model's chat format.

    messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]. The model's stored
    system prompt (from `llamaforge create --system`) is used when the messages have none. The chat format's
    end-of-turn ids stop generation. Returns a `Completion`, or a `TokenStream` when stream=True.
    """
    s = TokenStream(lm, _plan(lm, build_request(messages=messages, **kwargs), logits_processors))
    if stream:
        return s
    for _ in s:
        pass
    return s.completion


def prepare_chat(lm, messages: Sequence[dict], sampling: dict | None = None) -> tuple[list[int], SamplingParams]:
    """Token ids of the conversation (with the assistant header) and the SamplingParams to answer it with, as the
    seam plans them: model defaults (system prompt, options) applied, chat-format stop ids added."""
    p = plan(lm, build_request(messages=messages, **dict(sampling or {})))
    return p.prompt_ids, p.params


# Python keyword -> request feature. Everything else is a SamplingParams field.
_FEATURE_KWARGS = ("json_schema", "json_mode", "regex", "grammar", "grammar_syntax", "tools", "tool_choice",
                   "parallel_tool_calls", "retrieval", "guards", "n")


def build_request(*, messages=None, prompt=None, defaults: dict | None = None, **kwargs) -> GenerationRequest:
    """A `GenerationRequest` from Python keyword arguments (the Python API's and the CLI's spelling).

    json_mode=True: one JSON object; json_schema=dict; regex=str; grammar=str (grammar_syntax "lark" default,
    or "gbnf"); tools=[{"name", "description", "parameters"}] or OpenAI-style {"type": "function", "function":
    {...}}; tool_choice="auto"|"none"|"required"|NAME; retrieval={"collection", "k"} or a collection name;
    guards={"input", "output", "code", "model"}. Other keywords are sampling fields (SamplingParams).
    defaults: the caller's sampling defaults, under the model's stored options (default: max_tokens 256).
    """
    features = {k: kwargs.pop(k) for k in list(kwargs) if k in _FEATURE_KWARGS}
    req = GenerationRequest(messages=list(messages) if messages is not None and not isinstance(messages, (str, bytes))
                            else messages, prompt=prompt, options=kwargs,
                            defaults={"max_tokens": DEFAULT_MAX_TOKENS, **(defaults or {})})
    constraint = None
    if features.get("json_schema") is not None:
        constraint = Constraint("json_schema", schema=features["json_schema"], strict=True)
    elif features.get("regex") is not None:
        constraint = Constraint("regex", pattern=features["regex"])
    elif features.get("grammar") is not None:
        constraint = Constraint("grammar", grammar=features["grammar"],
                                syntax=features.get("grammar_syntax") or "lark")
    elif features.get("json_mode"):
        constraint = Constraint("json")
    req.constraint = constraint
    if constraint is not None:
        key = {"json_schema": "json_schema", "regex": "regex", "grammar": "grammar"}.get(constraint.kind, "json_mode")
        req.fields.update({"constraint": key, "constraint.schema": "json_schema", "constraint.pattern": "regex",
                           "constraint.grammar": "grammar", "constraint.syntax": "grammar_syntax"})
    if features.get("tools"):
        req.tools = [_tool(t) for t in features["tools"]]
    choice = features.get("tool_choice")
    if choice is not None:
        req.tool_choice = choice if choice in ("auto", "none", "required") or isinstance(choice, dict) \
            else {"name": choice}
    if features.get("parallel_tool_calls") is not None:
        req.parallel_tool_calls = bool(features["parallel_tool_calls"])
    r = features.get("retrieval")
    if r is not None:
        req.retrieval = Retrieval(r) if isinstance(r, str) else Retrieval(**r)
    g = features.get("guards")
    if g is not None:
        req.guards = g if isinstance(g, Guards) else Guards(**g)
    if features.get("n") is not None:
        req.n = features["n"]
    return req


def _tool(t) -> Tool:
    if isinstance(t, Tool):
        return t
    if not isinstance(t, dict):
        raise InvalidRequestError("each tool must be an object with a name", field="tools")
    fn = t.get("function", t) if t.get("type", "function") == "function" else t
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequestError("each tool needs a 'name'", field="tools")
    return Tool(fn["name"], fn.get("description") or "", fn.get("parameters") or {"type": "object",
                                                                                   "properties": {}})


def _plan(lm, request: GenerationRequest, logits_processors) -> Plan:
    p = plan(lm, request)
    if logits_processors:
        extra = list(logits_processors)
        p.stages = p.stages + [_CallerProcessors(extra)]
    return p


class _CallerProcessors(Stage):
    """Logits processors handed in by a Python caller (run after the seam's own)."""

    name = "caller_processors"

    def __init__(self, processors):
        self._processors = processors

    def processors(self, plan) -> list:
        return list(self._processors)


def _completion(req: Request, result, logprobs) -> Completion:
    return Completion(text=result.text, token_ids=list(req.output_ids), finish_reason=result.finish_reason,
                      usage=req.usage, logprobs=logprobs, cached_tokens=req.cached_tokens,
                      timings={"prompt_seconds": req.prompt_seconds, "decode_seconds": req.decode_seconds},
                      tool_calls=result.tool_calls, citations=result.citations, extra=result.extra)


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
