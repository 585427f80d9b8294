"""Batched log-likelihood scoring through the model: the one primitive perplexity, multiple-choice tasks and the
lm-evaluation-harness backend are built on.

A request is a token sequence and the index of its first scored token; the answer is the log-probability of each
scored token given everything before it, and whether it was the model's top choice (greedy). Sequences are sorted
by length and packed into batches (right-padded: a causal model's earlier positions never see the padding), one
forward per batch; the vocabulary projection runs only on the positions that are scored, in row chunks, so memory
stays at hidden-state size plus one chunk of logits whatever the batch.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..errors import ContextLengthError, InvalidRequestError
from ..generate.engine import context_length
from ..model.quant import Int8Linear, dense_matmuls

# Rows of logits materialised at once (rows x vocab float32: 512 x 128k = 256 MB at worst).
LOGIT_ROWS = 512
# Vocabulary rows of an int8 head dequantized at once (8192 x 576 float32 = 19 MB for SmolLM2).
HEAD_CHUNK = 8192
# Below this many rows the packed int8 kernel is faster than dequantizing the head.
HEAD_DENSE_ROWS = 64
# Tokens per forward when batching (batch rows x padded length); 2048 keeps CPU activations in cache-friendly sizes.
DEFAULT_BATCH_TOKENS = 2048


@dataclass
class Scored:
    """Scores of one request: `logprobs[i]` is log p(ids[first + i] | ids[:first + i]); `greedy[i]` says whether
    that token was the argmax."""

    logprobs: list[float]
    greedy: list[bool]

    @property
    def total(self) -> float:
        return float(math.fsum(self.logprobs))

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


def check_sequence(ids: Sequence[int], first: int, vocab_size: int, max_len: int) -> list[int]:
    """Validate one scoring request; returns the ids as a list."""
    ids = [int(i) for i in ids]
    if len(ids) < 2 or not 1 <= first < len(ids):
        raise InvalidRequestError(f"first scored token {first} must be in 1..{len(ids) - 1} "
                                  f"(a sequence of {len(ids)} tokens)", field="tokens")
    if len(ids) > max_len:
        raise ContextLengthError(len(ids), max_len)
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary (size {vocab_size})", field="tokens")
    return ids


def batches(lengths: Sequence[int], batch_tokens: int, max_rows: int | None = None) -> Iterator[list[int]]:
    """Indices of requests grouped into batches of at most `batch_tokens` padded tokens, longest first (so the
    first batch shows the peak memory and a progress bar's estimate only improves)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > batch_tokens or (max_rows and len(cur) >= max_rows)):
            yield cur
            cur = []
        cur.append(i)
    if cur:
        yield cur


def head_logits(head, h: torch.Tensor) -> torch.Tensor:
    """Float32 logits [n, V] of hidden states h [n, C].

    A packed int8 head (the default GGUF fast path) is dequantized in vocabulary chunks and run as a float32
    matmul when many rows are scored: for hundreds of rows that is about twice as fast as the int8 kernel, which
    is built for one-token decode (CPU time, 512 x 576 x 49152: 0.74 s vs 1.44 s), and it skips the kernel's
    bfloat16 rounding of the activations. Other heads run as they are.
    """
    if not isinstance(head, Int8Linear) or h.shape[0] < HEAD_DENSE_ROWS or h.device.type != "cpu":
        return head(h).float()
    x = h.float()
    out = torch.empty((x.shape[0], head.out_features), dtype=torch.float32, device=x.device)
    for a in range(0, head.out_features, HEAD_CHUNK):
        w = head.qweight[a:a + HEAD_CHUNK].float() * head.scale[a:a + HEAD_CHUNK, None].float()
        out[:, a:a + HEAD_CHUNK] = F.linear(x, w)
    if head.bias is not None:
        out += head.bias.float()
    return out


class ModelScorer:
    """Scores token sequences with an in-process model (a `LoadedModel`).

    batch_size: at most this many sequences per forward (None: as many as fit in `batch_tokens`).
    dense: int4 layers run as float32 GEMMs over their dequantized weights (`model.quant.dense_matmuls`: the
    same weights, about 3x faster at scoring sizes, float32 activations); False scores through the packed
    kernels generation uses, to measure what generation computes.
    """

    def __init__(self, lm, *, batch_size: int | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 dense: bool = True):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}",
                                      field="batch_size")
        self.lm = lm
        self.batch_size = batch_size
        self.batch_tokens = max(int(batch_tokens), 1)
        self.vocab_size = int(lm.config.vocab_size)
        self.max_len = context_length(lm)
        self.device = next(lm.model.parameters()).device
        self.dense = bool(dense)

    def score(self, requests: Sequence[tuple[Sequence[int], int]],
              progress: Callable[[int], None] | None = None) -> list[Scored]:
        """requests: [(ids, first_scored_index)]. Returns one `Scored` per request, in order. `progress(n)` is
        called after each batch with the number of requests it finished."""
        seqs = [check_sequence(ids, first, self.vocab_size, self.max_len) for ids, first in requests]
        firsts = [int(f) for _, f in requests]
        out: list[Scored | None] = [None] * len(seqs)
        for idx in batches([len(s) for s in seqs], self.batch_tokens, self.batch_size):
            for i, sc in zip(idx, self._score_batch([seqs[i] for i in idx], [firsts[i] for i in idx])):
                out[i] = sc
            if progress is not None:
                progress(len(idx))
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def log_probs(self, seqs: Sequence[list[int]], firsts: Sequence[int]):
        """Yield (row, positions' log-softmax [n, V] float32, targets [n]) for each sequence of one batch, where
        the n rows predict ids[first:]. Runs one forward for the whole batch."""
        width = max(len(s) for s in seqs)
        batch = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            batch[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        with dense_matmuls() if self.dense else contextlib.nullcontext():  # scored, never decoded from
            hidden = self.lm.model.hidden_states(batch.to(self.device))  # [B, T, C]
        for r, (s, first) in enumerate(zip(seqs, firsts)):
            h = hidden[r, first - 1:len(s) - 1]                     # [n, C]: the positions predicting ids[first:]
            targets = torch.tensor(s[first:], dtype=torch.long)
            for a in range(0, h.shape[0], LOGIT_ROWS):
                logits = head_logits(self.lm.model.lm_head, h[a:a + LOGIT_ROWS]).cpu()
                yield r, torch.log_softmax(logits, dim=-1), targets[a:a + LOGIT_ROWS]

    def _score_batch(self, seqs: list[list[int]], firsts: list[int]) -> list[Scored]:
        parts: list[list[tuple[list[float], list[bool]]]] = [[] for _ in seqs]
        for r, lp, targets in self.log_probs(seqs, firsts):
            chosen = lp.gather(1, targets[:, None])[:, 0]
            greedy = lp.argmax(-1) == targets
            parts[r].append((chosen.tolist(), greedy.tolist()))
        return [Scored([x for p in ps for x in p[0]], [g for p in ps for g in p[1]]) for ps in parts]
