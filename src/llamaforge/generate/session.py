"""A conversation with a model: history, the system message, the caller's sampling options, and answering the next
message through the request seam (what `llamaforge run` and other chat front ends share).

    session = ChatSession(lm, system="Be brief.", options={"temperature": 0}, defaults={"max_tokens": 1024})
    s = session.stream("Hello!")          # a TokenStream; iterate it for the answer's text
    for ev in s: print(ev.text, end="")
    session.commit("Hello!", s.completion)   # keep the turn in the history (a cancelled answer is not kept)
"""
from __future__ import annotations

from ..errors import ContextLengthError
from .api import TokenStream, build_request
from .engine import context_length
from .pipeline import Plan, plan

# Tokens kept free for the answer when old turns must be dropped to fit the context.
ANSWER_ROOM = 256


class ChatSession:
    """Conversation state. `defaults` are the front end's sampling defaults (under the model's stored options);
    `options` the caller's own choices (over them)."""

    def __init__(self, lm, *, system: str | None = None, options: dict | None = None,
                 defaults: dict | None = None):
        self.lm = lm
        self.system = system
        self.options = dict(options or {})
        self.defaults = dict(defaults or {})
        self.history: list[dict] = []
        self.context = context_length(lm)

    def messages_for(self, text: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + self.history + [{"role": "user", "content": text}]

    def plan(self, text: str) -> Plan:
        """The plan for answering `text`, dropping the oldest turns if the conversation no longer fits."""
        while True:
            try:
                p = plan(self.lm, build_request(messages=self.messages_for(text), defaults=self.defaults,
                                                **self.options))
            except ContextLengthError:
                if not self.history:
                    raise
                p = None
            if p is not None and (len(p.prompt_ids) + min(ANSWER_ROOM, p.params.max_tokens) <= self.context
                                  or not self.history):
                return p
            del self.history[:2]  # the oldest user/assistant pair

    def effective_options(self) -> dict:
        """The sampling settings the next answer would use (the front end's defaults, the model's stored
        options and the caller's, merged as the seam merges them)."""
        params = self.plan("?").params
        shown = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                 "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos")
        return {k: getattr(params, k) for k in shown}

    def stream(self, text: str) -> TokenStream:
        return TokenStream(self.lm, self.plan(text))

    def commit(self, text: str, completion) -> None:
        """Keep a finished turn in the history."""
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": completion.text}]

    def clear(self) -> None:
        self.history.clear()
