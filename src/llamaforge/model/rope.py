"""Rotary position embeddings: frequencies (with Llama 3.1 / linear scaling) and the q/k layout permutation.

HF (canonical here) rotates halves: dims [0, d/2) pair with [d/2, d). Meta checkpoints and GGUF files keep the
original interleaved pairing (0,1), (2,3), ... in the *weights* of q_proj/k_proj. `unpermute_qk` converts the
interleaved weight layout to HF's, `permute_qk` goes back. This is the only pair of such functions.
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, scaling applied (matches HF `_compute_*_parameters`)."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    if rs.rope_type == "factors":
        f = torch.tensor(rs.freq_factors, dtype=torch.float32)
        if f.numel() != inv.numel():
            from ..errors import ConfigError
            raise ConfigError(None, f"rope_freqs has {f.numel()} factors, expected {inv.numel()}")
        return inv / f
    # Llama 3.1 "llama3" scaling (Meta llama-models `apply_scaling`, HF `_compute_llama3_parameters`).
    old_ctx = rs.original_max_position_embeddings
    low_wavelen = old_ctx / rs.low_freq_factor
    high_wavelen = old_ctx / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (old_ctx / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def llama3_freq_factors(config: ModelConfig) -> torch.Tensor:
    """The per-frequency divisors llama.cpp stores as the `rope_freqs` tensor (unscaled / scaled)."""
    base = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.int64).float()
                                        / config.head_dim))
    return base / inv_frequencies(config)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin for `positions` [B, T] -> each [B, T, head_dim], computed in float32 then cast."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved (Meta/GGUF) q/k weight rows -> HF half-split rows. Works for weights [out, in] and biases [out]."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split q/k weight rows -> interleaved (Meta/GGUF). Inverse of `unpermute_qk`."""
    out = w.shape[0]
    return w.reshape(n_heads, 2, out // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
