"""Keys/values of prompt prefixes shared across requests (system prompts, few-shot examples, RAG context).

The cache holds blocks of `block` prompt tokens. Block k of a prompt is keyed by a hash chain over tokens
0..(k+1)*block-1, so a block is found only behind the exact same prefix, and it stores that block's keys and
values for every layer (a copy, so it outlives the cache row that computed it). Least recently used blocks are
dropped once the blocks together exceed `max_bytes`. A hit is checked token by token, never trusted to a hash.

Only positions computed by a prompt prefill on the aligned grid are stored (generate/engine.py decides), which
keeps a request's tokens the same whether its prefix came from here or was computed afresh.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import torch

DEFAULT_PREFIX_CACHE_BYTES = 128 * 1024 * 1024


class _Block:
    __slots__ = ("tokens", "k", "v", "nbytes")

    def __init__(self, tokens: tuple[int, ...], k: torch.Tensor, v: torch.Tensor):
        self.tokens, self.k, self.v = tokens, k, v  # k, v: [layers, kv_heads, block, head_dim]
        self.nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()


def _chain(prev: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(b"".join(int(t).to_bytes(4, "little") for t in tokens))
    return h.digest()


class PrefixCache:
    """LRU store of key/value blocks keyed by token-prefix hash; `lookup`, `load_into`, `store`, `stats`."""

    def __init__(self, block: int, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES):
        if block < 1 or max_bytes < 0:
            raise ValueError("PrefixCache needs block >= 1 and max_bytes >= 0")
        self.block, self.max_bytes = block, max_bytes
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self.nbytes = 0
        self.lookups = 0          # prompts looked up
        self.lookup_tokens = 0    # tokens they could have reused (whole blocks before the last prompt token)
        self.hit_tokens = 0       # tokens found here
        self.evictions = 0

    def _keys(self, ids: Sequence[int], n_blocks: int, salt: bytes = b"") -> list[bytes]:
        keys, prev = [], salt
        for k in range(n_blocks):
            prev = _chain(prev, ids[k * self.block:(k + 1) * self.block])
            keys.append(prev)
        return keys

    def lookup(self, ids: Sequence[int], limit: int, salt: bytes = b"") -> list[_Block]:
        """The cached blocks that start `ids`, at most `limit` tokens of them, in order (counted in stats).
        `salt` separates blocks computed by different kernels (the engine's prefill paths)."""
        n = max(0, limit) // self.block
        self.lookups += 1
        self.lookup_tokens += n * self.block
        found = []
        for k, key in enumerate(self._keys(ids, n, salt)):
            blk = self._blocks.get(key)
            if blk is None or blk.tokens != tuple(ids[k * self.block:(k + 1) * self.block]):
                break
            self._blocks.move_to_end(key)
            found.append(blk)
        return found

    def count_hit(self, tokens: int) -> None:
        """Record `tokens` prompt tokens reused (from here or from a row that still held them)."""
        self.hit_tokens += tokens

    @staticmethod
    def load_into(blocks: list[_Block], cache, row: int, first: int, block: int) -> None:
        """Copy blocks[first:] into `row` of a KVCache at their positions."""
        for k in range(first, len(blocks)):
            a, b = k * block, (k + 1) * block
            for layer in range(len(cache.k)):
                cache.k[layer][row, :, a:b] = blocks[k].k[layer]
                cache.v[layer][row, :, a:b] = blocks[k].v[layer]

    def store(self, ids: Sequence[int], cache, row: int, upto: int, salt: bytes = b"") -> None:
        """Keep the blocks of `ids[:upto]` held in `row` of `cache` (whole blocks only; known ones just touched)."""
        if self.max_bytes == 0:
            return
        n = max(0, upto) // self.block
        for k, key in enumerate(self._keys(ids, n, salt)):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            a, b = k * self.block, (k + 1) * self.block
            blk = _Block(tuple(ids[a:b]), torch.stack([t[row, :, a:b] for t in cache.k]),
                         torch.stack([t[row, :, a:b] for t in cache.v]))
            if blk.nbytes > self.max_bytes:
                return
            self._blocks[key] = blk
            self.nbytes += blk.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self._blocks.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, float]:
        """blocks, bytes, lookups, lookup_tokens, hit_tokens, hit_rate (hit / lookup tokens), evictions."""
        rate = self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0
        return {"blocks": len(self._blocks), "bytes": self.nbytes, "lookups": self.lookups,
                "lookup_tokens": self.lookup_tokens, "hit_tokens": self.hit_tokens, "hit_rate": rate,
                "evictions": self.evictions}


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
