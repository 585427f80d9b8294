"""The constrained-decoding logits processor: one grammar matcher per generated row.

Each call advances the matcher by the tokens sampled since the last call, asks llguidance for the bitmask of
allowed next tokens (one bit per id, computed in Rust), and applies it as tensor ops: each mask byte looks up 8
additive values (0 or -inf) and the result is added to the logits. No Python loop touches the vocabulary.
The stop ids of the request (EOS, the chat format's end of turn, `stop_ids`) are allowed exactly when the grammar
accepts what has been generated, so a row can only end normally on a complete match. It runs after the penalties
and before temperature / top-k / top-p / min-p (see `sampling.Sampler`), so it composes with all of them.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .engine import Grammar

# byte value -> 8 additive mask values, bit i of the byte = token 8k + i (little-endian words, as llguidance fills)
_BYTE_TABLE = torch.where(((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).bool(),
                          torch.tensor(0.0), torch.tensor(float("-inf")))


class GrammarLogitsProcessor:
    """Allow only tokens that keep the output inside `grammar`; allow `stop_ids` only where it is complete.

    `failed` becomes llguidance's reason when the matcher hits a resource limit or an id it cannot take (a
    caller's processor forced one): from then on only the stop ids are allowed, ending the row.
    """

    def __init__(self, grammar: Grammar, stop_ids: Iterable[int], *, matcher=None, seen: int | None = None):
        self.grammar = grammar
        self.matcher = matcher if matcher is not None else grammar.matcher()
        n = grammar.lltok.vocab_size
        self.vocab = n
        self._words = torch.zeros((n + 31) // 32, dtype=torch.int32)
        stops = sorted(set(stop_ids))
        self._stops = torch.tensor(stops, dtype=torch.long)
        # llguidance itself allows its end ids (the tokenizer's) exactly when the grammar accepts; the request's
        # other stop ids (a chat format's end of turn, stop_ids) get the same rule here.
        own = set(grammar.lltok.eos_tokens)
        extra = [i for i in stops if i not in own and i < n]
        self._extra_stops = torch.tensor(extra, dtype=torch.long) if extra else None
        self._seen: int | None = seen  # tokens of token_ids already reflected in the matcher (None: the prompt's)
        self.failed = ""

    def _advance(self, token_ids: Sequence[int]) -> None:
        if self._seen is None:
            self._seen = len(token_ids)  # the prompt is not part of the constrained output
            return
        for t in token_ids[self._seen:]:
            if not self.failed and not self.matcher.consume_token(int(t)):
                self.failed = self.matcher.get_error() or f"token {t} does not fit the grammar"
        self._seen = len(token_ids)

    def __call__(self, token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self._advance(token_ids)
        if not self.failed:
            self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
            if self.matcher.is_error():
                self.failed = self.matcher.get_error()
        if self.failed:
            stops = self._stops[self._stops < logits.shape[-1]]
            keep = logits[stops]
            logits.fill_(float("-inf"))
            logits[stops] = keep
            return logits
        bias = torch.nn.functional.embedding(self._words.view(torch.uint8).long(), _BYTE_TABLE).view(-1)
        if self._extra_stops is not None:
            bias.index_fill_(0, self._extra_stops, 0.0 if self.matcher.is_accepting() else float("-inf"))
        v = logits.shape[-1]
        if v <= self.vocab:
            logits += bias[:v]
        else:
            logits[:self.vocab] += bias[:self.vocab]
            logits[self.vocab:] = float("-inf")  # ids the tokenizer does not have (a padded embedding)
        return logits


def allowed_ids(processor: GrammarLogitsProcessor, token_ids: Sequence[int], vocab_size: int) -> list[int]:
    """The ids `processor` allows after `token_ids` (for tests and debugging; the processor's state advances)."""
    out = processor(token_ids, torch.zeros(vocab_size))
    return torch.nonzero(torch.isfinite(out))[:, 0].tolist()
