"""The prompt-prefix cache shared across requests (generate/prefix_cache.py) inside BatchEngine, on a tiny random
Llama: hits behind a shared prefix after the row that computed it was overwritten, the same tokens as a fresh
engine, the memory bound (LRU), hit-rate statistics, and turning it off."""
from __future__ import annotations

import pytest
import torch

from llamaforge.generate import BatchEngine, SamplingParams
from llamaforge.generate.prefix_cache import PrefixCache
from test_generate_support import BOS, tiny_lm

SHARED = [BOS] + list(b"You are a careful assistant. Answer briefly and cite the document. " * 2)[:135]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama31")


def _greedy(engine, prompt, n=10):
    req = engine.add(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    while not req.done:
        engine.step()
    return req


def test_a_shared_prefix_is_reused_after_its_row_was_overwritten(lm):
    engine = BatchEngine(lm, max_batch=1, max_seq_len=512, prefill_chunk=16)
    a = _greedy(engine, SHARED + list(b"Question: what is a bridge?"))
    _greedy(engine, [BOS] + list(b"an unrelated prompt that takes over the only row " * 3))
    c = _greedy(engine, SHARED + list(b"Question: why is steel strong?"))
    assert a.cached_tokens == 0
    assert c.cached_tokens == len(SHARED) // 64 * 64 == 128  # whole 64-token blocks behind the shared prefix
    fresh = _greedy(BatchEngine(lm, max_batch=1, max_seq_len=512, prefill_chunk=16, prefix_cache_bytes=0),
                    c.prompt_ids)
    assert fresh.cached_tokens == 0 and c.output_ids == fresh.output_ids
    st = engine.prefix_cache.stats()
    assert st["hit_tokens"] == 128 and st["blocks"] >= 2 and 0 < st["hit_rate"] < 1
    assert st["bytes"] == sum(b.nbytes for b in engine.prefix_cache._blocks.values())


def test_memory_bound_evicts_least_recently_used_blocks(lm):
    block_bytes = 2 * lm.config.num_hidden_layers * lm.config.num_key_value_heads * 64 * lm.config.head_dim * \
        torch.finfo(torch.float32).bits // 8
    engine = BatchEngine(lm, max_batch=1, max_seq_len=512, prefill_chunk=16, prefix_cache_bytes=2 * block_bytes)
    prompts = [[BOS] + [10 + i] * 70 for i in range(4)]  # one whole block each
    for p in prompts:  # each newcomer overwrites the only row, whose block moves to the shared cache
        _greedy(engine, p, n=2)
    st = engine.prefix_cache.stats()
    assert st["blocks"] == 2 and st["bytes"] <= 2 * block_bytes and st["evictions"] == 1
    pc = engine.prefix_cache
    assert pc.lookup(prompts[0], 69) == []            # the oldest went first
    assert len(pc.lookup(prompts[1], 69)) == 1 and len(pc.lookup(prompts[2], 69)) == 1


def test_no_cache_when_turned_off(lm):
    engine = BatchEngine(lm, max_batch=1, max_seq_len=512, prefill_chunk=16, prefix_cache_bytes=0)
    _greedy(engine, SHARED + [1, 2, 3])
    _greedy(engine, [BOS] + [7] * 80)
    assert _greedy(engine, SHARED + [4, 5, 6]).cached_tokens == 0
    assert engine.prefix_cache.stats()["blocks"] == 0


def test_a_hash_hit_is_checked_token_by_token():
    pc = PrefixCache(block=4)
    cache = type("C", (), {})()
    cache.k = [torch.arange(32.).view(1, 1, 8, 4)]
    cache.v = [torch.arange(32.).view(1, 1, 8, 4)]
    pc.store([1, 2, 3, 4, 5, 6, 7, 8], cache, 0, 8)
    assert len(pc.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9], 8)) == 2
    key = next(iter(pc._blocks))
    pc._blocks[key].tokens = (9, 9, 9, 9)              # as if another prefix had collided with this hash
    assert pc.lookup([1, 2, 3, 4, 5, 6, 7, 8], 8) == []
    with pytest.raises(ValueError):
        PrefixCache(block=0)
