"""The model side of an evaluation: score (context, continuation) pairs and generate answers, in process.

`InProcessBackend` wraps a loaded model. Scoring splits a pair into tokens the way lm-evaluation-harness does
(trailing spaces of the context move to the continuation; the whole text is encoded and cut after the context's
own tokens) and runs the pairs in batches through `scoring.ModelScorer`. Generation goes through the request seam
(`generate.pipeline.plan`: the model's chat format, stop strings, its output stages) and decodes many requests at
once on one `BatchEngine` (continuous batching), greedy. `eval.remote.ServerBackend` is the same interface over
HTTP.
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..errors import InvalidRequestError
from ..generate.api import build_request
from ..generate.engine import BatchEngine, context_length
from ..generate.pipeline import plan
from .scoring import DEFAULT_BATCH_TOKENS, ModelScorer

_CACHE_ROUND = 256
# Greedy, and no penalties: an evaluation scores the model, not a sampling recipe stored with it.
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context belongs to the continuation (it tokenizes with the next word)."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


class InProcessBackend:
    """Evaluate a `LoadedModel` in this process.

    batch_size: sequences per scoring forward / requests decoded together (None: scoring fills `batch_tokens`,
    generation decodes 8 at a time). allow_special: control-token text in prompts becomes control tokens (what
    lm-evaluation-harness expects of chat-templated text); off by default, so task data stays plain text.
    """

    kind = "in-process"

    def __init__(self, lm, *, batch_size: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 allow_special: bool = False, label: str | None = None):
        if lm.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; evaluation needs one", field="model")
        self.lm = lm
        self.batch_size = batch_size
        self.scorer = ModelScorer(lm, batch_size=batch_size, batch_tokens=batch_tokens)
        self.allow_special = allow_special
        self.label = label or lm.name or (lm.path.name if lm.path is not None else "model")
        self.max_length = context_length(lm)

    # -- tokens ---------------------------------------------------------------------------------------------
    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of `text`; BOS first when the model expects one (and `bos`)."""
        tok = self.lm.tokenizer
        ids = list(tok.encode(text, allow_special=self.allow_special))
        if bos and getattr(tok, "add_bos", False) and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, tok.bos_id)
        return ids

    @property
    def prefix_id(self) -> int:
        """The token an empty context is replaced by: BOS, else EOS."""
        tok = self.lm.tokenizer
        if tok.bos_id is not None:
            return tok.bos_id
        if tok.eos_id is not None:
            return tok.eos_id
        raise InvalidRequestError("an empty context needs a BOS or EOS token and this model has neither",
                                  field="context")

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-evaluation-harness splits a pair."""
        if context == "":
            cont = self.encode(continuation, bos=False)
            if not cont:
                raise InvalidRequestError("the continuation is empty", field="continuation")
            if cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        context, continuation = split_trailing_space(context, continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # -- scoring --------------------------------------------------------------------------------------------
    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], *, truncate: bool = False,
                     progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each continuation given its context, both token ids. `truncate` drops
        the oldest context tokens of a pair longer than the model's context (lm-evaluation-harness does);
        otherwise such a pair is an error."""
        reqs = []
        for ctx, cont in pairs:
            if not cont:
                raise InvalidRequestError("a continuation encodes to no tokens", field="continuation")
            ids = list(ctx) + list(cont)
            if truncate and len(ids) > self.max_length:
                ids = ids[-self.max_length:]
            first = len(ids) - len(cont)
            if first < 1:
                raise InvalidRequestError(f"a continuation of {len(cont)} tokens leaves no room for context in "
                                          f"{self.max_length} tokens", field="continuation")
            reqs.append((ids, first))
        return [(s.total, s.is_greedy) for s in self.scorer.score(reqs, progress=progress)]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]],
                      progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each text continuation given its text context."""
        return self.score_tokens([self.encode_pair(c, x) for c, x in pairs], progress=progress)

    # -- generation -----------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | list[dict]], *, max_tokens: int, stop: Sequence[str] = (),
                 progress: Callable[[int], None] | None = None) -> list[str]:
        """Greedy answers. A prompt is raw text (no chat format) or a list of chat messages."""
        return generate_batch(self.lm, prompts, max_tokens=max_tokens, stop=stop,
                              batch_size=self.batch_size or 8, progress=progress)


def generate_batch(lm, prompts: Sequence[str | list[dict]], *, max_tokens: int, stop: Sequence[str] = (),
                   batch_size: int = 8, progress: Callable[[int], None] | None = None,
                   options: dict | None = None) -> list[str]:
    """Answers for many prompts (text, token ids or chat messages), planned by the seam and decoded `batch_size`
    at a time on one engine."""
    opts = dict(GREEDY, **(options or {}), max_tokens=max_tokens, stop=list(stop))
    plans = []
    for p in prompts:
        is_chat = isinstance(p, list) and bool(p) and isinstance(p[0], dict)
        req = build_request(messages=p, **opts) if is_chat else build_request(prompt=p, **opts)
        plans.append(plan(lm, req))
    if not plans:
        return []
    ctx = context_length(lm)
    need = max(len(p.prompt_ids) + p.params.max_tokens + 1 for p in plans)
    size = min(ctx, -(-need // _CACHE_ROUND) * _CACHE_ROUND)
    engine = BatchEngine(lm, max_batch=max(1, min(batch_size, len(plans))), max_seq_len=size)
    texts: list[str | None] = [None] * len(plans)
    live: dict[int, tuple[int, object]] = {}   # engine request id -> (index, output filter)
    queued = []
    for i, p in enumerate(plans):
        if p.refusal is not None:  # an input stage refused: its text is the answer
            texts[i] = p.refusal.text
            continue
        r = engine.add(p.prompt_ids, p.params, p.processors())
        live[r.id] = (i, p.output())
        queued.append(r)
    try:
        while engine.has_work():
            for r, ev in engine.step():
                i, out = live[r.id]
                out.feed(ev.text)
                if ev.finish_reason is not None:
                    _, result = out.finish(ev.finish_reason)
                    texts[i] = result.text
                    if progress is not None:
                        progress(1)
    finally:  # an interrupted run leaves nothing decoding
        for r in queued:
            if not r.done:
                engine.cancel(r)
    return [t if t is not None else "" for t in texts]
