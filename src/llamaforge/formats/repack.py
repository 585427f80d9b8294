"""Pack a model again after an adapter was merged into its float weights (`create NAME --adapter DIR`).

The merged weights are the base's dequantized 4-bit values plus a small update, so packing them again rounds a
second time. Plain min/max groups (`model.quant.int4_from_float`) made the perplexity 1.1% worse than the float32
merged model on SmolLM2; fitting each group's scale and offset by least squares to its codes (a few rounds of
"round to the grid, refit the grid", started from slightly narrowed ranges, the best kept per group, as
llama.cpp's k-quant searches do) halves that error (figures: bench/NOTES.md, fine-tuned models). The packed
layout is the base's own, so the fine-tuned model runs the same kernels and the same compiled step.
"""
from __future__ import annotations

import torch

from ..model.quant import GROUP, int8_from_float, quantize_model

_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)   # starting ranges, as fractions of the group's min..max
_ROUNDS = 4                              # round/refit rounds per start (each never increases the error)


def int4_fitted(w: torch.Tensor):
    """Asymmetric 4-bit groups of 32 with least-squares scales -> (q [N,K] uint8, scale, zero [N,K/32]), the
    layout of `model.quant.int4_from_float` (value = (q - 8) * scale + zero)."""
    N, K = w.shape
    g = w.float().reshape(N, K // GROUP, GROUP)
    lo0, hi0 = g.amin(-1), g.amax(-1)
    mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    mean = g.mean(-1)
    best_err = torch.full_like(mid, float("inf"))
    best_q = torch.zeros_like(g, dtype=torch.uint8)
    best_scale, best_lo = torch.ones_like(mid), lo0.clone()
    for f in _SHRINK:
        lo = mid - half * f
        scale = (2 * half * f / 15).clamp_min(1e-12)
        for _ in range(_ROUNDS):
            q = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15)
            qm = q.mean(-1)
            dq = q - qm[..., None]
            var = (dq * dq).sum(-1)
            fitted = (dq * (g - mean[..., None])).sum(-1) / var.clamp_min(1e-12)
            scale = torch.where(var > 0, fitted, scale).clamp_min(1e-12)  # all codes equal: keep the grid
            lo = mean - scale * qm
        q = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15)
        err = ((q * scale[..., None] + lo[..., None] - g) ** 2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[..., None], q.to(torch.uint8), best_q)
        best_scale = torch.where(better, scale, best_scale)
        best_lo = torch.where(better, lo, best_lo)
    return best_q.reshape(N, K), best_scale, best_lo + 8 * best_scale


class _MergedSource:
    """quantize_model's weight source over a dense model whose adapter was merged: fitted int4 or int8 rows."""

    file_type = None

    def __init__(self, model):
        self.model = model

    def _weight(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name).detach()

    def get(self, i: int, block: str, proj: str, quant: str):
        w = self._weight(f"model.layers.{i}.{block}.{proj}.weight")
        return int4_fitted(w) if quant == "q4" else (*int8_from_float(w), None)

    def int8(self, name: str):
        return int8_from_float(self._weight(name))

    def fill(self, model, name):  # every weight of a merged dense model is loaded
        raise ValueError(f"parameter {name!r} is not loaded")


def repack_merged(model, quant: str, *, device="cpu"):
    """Convert a dense `Llama` (adapter already merged) to `quant` ("q4" or "int8") in place; returns it."""
    return quantize_model(model, quant, _MergedSource(model), device=device)
