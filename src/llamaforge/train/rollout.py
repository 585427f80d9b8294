"""Sampling K completions per prompt from the policy being trained, through the batched engine.

Every (prompt, sample) pair is one request of one `BatchEngine`: all of them decode together in batched forwards
(continuous batching over one KV cache), not in a per-sample loop. Each request has its own seed, derived from
the caller's seed, the prompt's index and the sample's index, so a run (and a resumed run) samples the same
completions. The engine is built fresh for each call: its prefix reuse must never serve keys and values
computed by weights from before the last optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..generate.engine import BatchEngine, context_length
from ..generate.sampling import SamplingParams

MAX_ROWS = 64  # concurrent requests (cache rows); more wait in the engine's queue


@dataclass
class Completion:
    """One sampled completion. token_ids include the final stop token when generation ended on one (the
    policy chose to stop, and learns that too); text excludes it."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    finish_reason: str


def sample_seed(seed: int, *parts: int) -> int:
    """A reproducible per-request seed from the run's seed and indices (splitmix-style mixing)."""
    x = seed & 0xFFFFFFFFFFFFFFFF
    for p in parts:
        x = (x ^ (p + 0x9E3779B97F4A7C15 + (x << 6) + (x >> 2))) & 0xFFFFFFFFFFFFFFFF
        x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFF


def sample_completions(lm, prompts: Sequence[Sequence[int]], k: int, *, max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, salt: Sequence[int] = (),
                       stop_ids: Sequence[int] = (), max_rows: int = MAX_ROWS) -> list[list[Completion]]:
    """k completions for each prompt (token ids), as [prompt][sample].

    temperature 0 is greedy (then k copies agree). Top-k and min-p are off and top_p defaults to 1, so with
    temperature 1 the samples follow the policy's own distribution (what policy-gradient methods assume).
    salt: extra integers mixed into every request's seed (e.g. the training step).
    """
    model = lm.model
    was_training = model.training
    model.eval()
    longest = max(len(p) for p in prompts)
    engine = BatchEngine(lm, max_batch=max(1, min(max_rows, len(prompts) * k)),
                         max_seq_len=min(context_length(lm), longest + max_new_tokens + 1))
    reqs = {}
    for i, ids in enumerate(prompts):
        for j in range(k):
            params = SamplingParams(max_tokens=max_new_tokens, temperature=float(temperature), top_k=0,
                                    top_p=float(top_p), min_p=0.0, repeat_penalty=1.0,
                                    seed=sample_seed(seed, *salt, i, j), stop_ids=tuple(stop_ids))
            reqs[engine.add(list(ids), params).id] = (i, j)
    tokens: dict[int, list[int]] = {rid: [] for rid in reqs}
    finished = {}
    try:
        while engine.has_work():
            for req, ev in engine.step():
                tokens[req.id].append(ev.id)
                if ev.finish_reason is not None:
                    finished[req.id] = req
    finally:
        if was_training:
            model.train()
    out: list[list[Completion | None]] = [[None] * k for _ in prompts]
    for rid, (i, j) in reqs.items():
        req = finished[rid]
        ids = tokens[rid]
        if req.finish_reason == "stop" and len(ids) > len(req.output_ids):
            ids = req.output_ids + [ids[-1]]   # ended on a stop token: keep it as the last target
        else:
            ids = list(req.output_ids)
        out[i][j] = Completion(i, j, ids, req.text, req.finish_reason or "length")
    return out  # type: ignore[return-value]


def completion_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Completion]
                    ) -> list[tuple[list[int], list[bool]]]:
    """(prompt + completion ids, mask on the completion) rows for data.collate."""
    rows = []
    for c in completions:
        p = list(prompts[c.prompt_index])
        rows.append((p + c.token_ids, [False] * len(p) + [True] * len(c.token_ids)))
    return rows


@torch.no_grad()
def greedy_completions(lm, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                       stop_ids: Sequence[int] = ()) -> list[Completion]:
    """One greedy completion per prompt (held-out evaluation)."""
    return [c[0] for c in sample_completions(lm, prompts, 1, max_new_tokens=max_new_tokens, temperature=0.0,
                                             stop_ids=stop_ids)]
