"""Context-aware decoding (Shi et al., "Trusting Your Evidence", 2023): sample from
    (1 + alpha) * log p(y | context, x) - alpha * log p(y | x)
so that what the given context says outweighs what the model believes without it. Grounded answers use it:
a small model shown "Veltmark was founded in 1647" still tends to answer from its prior ("2019"); the contrast
with the same conversation without the sources cancels that prior.

`ContextContrast` is a logits processor. It runs the model on the context-free prompt beside the request, one
token per step, in its own small KV cache (through the compiled decode step when `lm` has one): the request's own
forward pass (batched, compiled) is untouched.
Only tokens the context-conditioned model itself finds plausible (probability >= `PLAUSIBLE` x the best one's)
can be chosen, so the contrast never promotes a token the grounded model rules out.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .prefix_cache import common_prefix

PLAUSIBLE = 0.1


class ContextContrast:
    """Logits processor: contrast the request's logits with those of `plain_ids` (the prompt without its context)
    continued by the same generated tokens. `prompt_len`: the request's prompt length (generated tokens follow
    it in the ids the sampler passes). `max_new`: how many tokens the request may generate."""

    def __init__(self, model, plain_ids: Sequence[int], prompt_len: int, alpha: float, max_new: int, lm=None):
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.model = model
        self.lm = lm                   # a LoadedModel: single-token steps go through its compiled step
        self.plain = list(plain_ids)
        self.prompt_len = int(prompt_len)
        self.alpha = float(alpha)
        self.capacity = len(self.plain) + int(max_new) + 1
        self.cache = None
        self.fed: list[int] = []       # the tokens the plain sequence's cache holds (plain prompt + generated)
        self.last: torch.Tensor | None = None

    def _advance(self, generated: Sequence[int]) -> torch.Tensor | None:
        """Log-probabilities of the plain sequence's next token after `generated` (None past its capacity)."""
        seq = self.plain + list(generated)
        if len(seq) >= self.capacity:
            return None
        if self.cache is None:
            self.cache = self.model.new_cache(1, self.capacity)
        done = common_prefix(self.fed, seq)   # a rejected speculative draft rolls back to the first difference
        if done == len(self.fed) == len(seq) and self.last is not None:
            return self.last
        done = min(done, len(seq) - 1)        # at least the last token is fed: its logits are the answer
        todo, pos = seq[done:], done
        device = self.model.model.norm.weight.device
        with torch.inference_mode():
            if len(todo) == 1 and pos > 0 and self.lm is not None:
                from .compiled import decode_one
                logits = decode_one(self.lm, todo[0], self.cache, pos)
            else:
                ids = torch.tensor([todo], dtype=torch.long, device=device)
                logits = self.model(ids, cache=self.cache, input_pos=pos, last_only=True)[0, -1]
        self.cache.lengths[0] = len(seq)
        self.fed = seq
        self.last = torch.log_softmax(logits.detach().float().cpu(), dim=-1)
        return self.last

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        plain = self._advance(list(token_ids[self.prompt_len:]))
        if plain is None or plain.shape != logits.shape:
            return logits
        grounded = torch.log_softmax(logits.float(), dim=-1)
        out = (1 + self.alpha) * grounded - self.alpha * plain
        floor = grounded.max() + math.log(PLAUSIBLE)
        return out.masked_fill(~(grounded >= floor), float("-inf"))
