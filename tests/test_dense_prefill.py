"""Dense prefill of long prompts on the default (packed int4) path: which prompts take it, that it keeps a
request's tokens independent of chunking and prefix reuse, and that keys/values never cross prefill paths.
(The full batch / streaming / reuse matrix is tests/test_determinism.py, marked slow.)"""
from __future__ import annotations

from pathlib import Path

import pytest

import llamaforge
from llamaforge.generate import engine as E
from llamaforge.generate.engine import BatchEngine
from llamaforge.generate.sampling import SamplingParams

ESSAY = (Path(__file__).resolve().parent.parent / "bench" / "texts" / "essay.txt").read_text()


@pytest.fixture(scope="module")
def lm(smollm2_gguf):
    lm = llamaforge.load(str(smollm2_gguf), compile=False)
    assert lm.model._quant == "q4"
    return lm


def _greedy(n=6):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _run(engine, prompt, params=None):
    req = engine.add(prompt, params or _greedy())
    while not req.done:
        engine.step()
    return req


def _ids(lm, start, n):
    ids = lm.tokenizer.encode(" ".join(ESSAY.split()[start:start + n * 2]))
    assert len(ids) >= n
    return ids[:n]


def test_long_prompts_take_dense_prefill_and_stay_deterministic(lm):
    long = _ids(lm, 30, 300)
    chunked = BatchEngine(lm, max_batch=1, max_seq_len=512, prefill_chunk=64)
    whole = BatchEngine(lm, max_batch=1, max_seq_len=512)
    assert whole.dense_prefill_tokens == E.DENSE_PREFILL_TOKENS
    a = _run(whole, long)
    b = _run(whole, long)                 # repeated: reuses the cached prefix, recomputes the tail
    c = _run(chunked, long)               # other chunk sizes (and a tail chunk of fewer than 16 rows)
    assert a.dense and b.dense and c.dense
    assert b.cached_tokens > 0
    assert a.output_ids == b.output_ids == c.output_ids and len(a.output_ids) == 6


def test_short_prompts_keep_the_packed_kernel_and_paths_never_share_keys(lm):
    long = _ids(lm, 100, 200)
    short = long[:E.DENSE_PREFILL_TOKENS - 1]   # same prefix, below the threshold: the packed-kernel path
    engine = BatchEngine(lm, max_batch=1, max_seq_len=512)
    first = _run(engine, long)
    s = _run(engine, short)
    assert first.dense and not s.dense
    assert s.cached_tokens == 0                  # the long prompt's dense keys are not reused for it
    fresh = _run(BatchEngine(lm, max_batch=1, max_seq_len=512), short)
    assert s.output_ids == fresh.output_ids
    again = _run(engine, short)                  # its own path's keys are reused
    assert again.cached_tokens > 0 and again.output_ids == fresh.output_ids


def test_dense_prefill_can_be_turned_off(lm, monkeypatch):
    monkeypatch.setenv("LLAMAFORGE_DENSE_PREFILL", "0")
    engine = BatchEngine(lm, max_batch=1, max_seq_len=512)
    assert engine.dense_prefill_tokens is None
    assert not _run(engine, _ids(lm, 30, 200)).dense
