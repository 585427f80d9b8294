"""Preallocated key/value cache, passed into `Llama.forward`.

One cache holds `batch_size` independent rows ("slots"). Each forward call names the rows it works on and the
absolute positions of its tokens, so a server can keep one row per request, prefill a newcomer into a free row
while others decode, and free a row by simply forgetting its length.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", static: bool = False):
        """static=True: attention always spans the whole cache and writes never read positions back to Python,
        so shapes are fixed and nothing syncs (what CUDA graphs / torch.compile need); the caller keeps
        positions below max_seq_len. The default attends only up to the furthest position, faster in eager."""
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError("KVCache needs batch_size >= 1 and max_seq_len >= 1")
        self.static = static
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        shape = (batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        # Number of valid positions per row; engines keep it up to date (the model does not read it).
        self.lengths = [0] * batch_size

    @classmethod
    def wrap(cls, k: list[torch.Tensor], v: list[torch.Tensor]) -> "KVCache":
        """A cache around existing per-layer tensors [B, n_kv, max_len, D] (used when tracing the decode step)."""
        cache = cls.__new__(cls)
        cache.static, cache.k, cache.v = False, k, v
        cache.batch_size, cache.max_seq_len = k[0].shape[0], k[0].shape[2]
        cache.lengths = []  # not tracked: a wrapped cache belongs to its caller (and its row count may be symbolic)
        return cache

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    def update(self, layer: int, rows: torch.Tensor | None, positions: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, span: int, start: int | None = None):
        """Write k/v [B, n_kv, T, D] at `positions` [B, T] of `rows` [B]; return keys/values [B, n_kv, span, D].

        `rows=None` means rows 0..B-1 and `start` (an int) says every row writes positions start..start+T-1: then
        the write is a slice and the result a view, with no index tensors and no host sync (what a traced or
        compiled decode step needs).
        """
        kc, vc = self.k[layer], self.v[layer]
        B, _, T, _ = k.shape
        if rows is None:
            if start is not None:
                kc[:B, :, start:start + T] = k
                vc[:B, :, start:start + T] = v
            else:
                r = torch.arange(B, device=k.device)[:, None].expand(B, T)
                kc[r, :, positions] = k.transpose(1, 2).to(kc.dtype)
                vc[r, :, positions] = v.transpose(1, 2).to(vc.dtype)
            return kc[:B, :, :span], vc[:B, :, :span]
        r = rows[:, None].expand(B, T)
        kc[r, :, positions] = k.transpose(1, 2).to(kc.dtype)
        vc[r, :, positions] = v.transpose(1, 2).to(vc.dtype)
        return kc[rows, :, :span], vc[rows, :, :span]

    def reset(self, row: int | None = None) -> None:
        """Forget a row (or all). Stale values stay in memory but are masked out by position."""
        if row is None:
            self.lengths = [0] * self.batch_size
        else:
            self.lengths[row] = 0
