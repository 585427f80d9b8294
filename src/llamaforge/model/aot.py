"""The single-token decode step, traced from the model's own forward and compiled ahead of time (AOTInductor).

Why: in eager PyTorch a decode step of a small model is mostly dispatch: ~600 small ops at 1-3 us each cost
~4-5 ms per token, as much as the weight kernels themselves (bench/NOTES.md). Inductor fuses the small ops into a
few C++ loops. Doing that with `torch.compile` at run time would import dynamo and inductor (+150 MB resident)
and compile for 10-60 s in every process, so instead the step is exported once and compiled into a shared
library (`build(model, path)`), which `CompiledDecoder` later runs through PyTorch's C++ runner alone.

What is traced is the model's own code (`Llama.forward` with one new token at one position for one row, cache
written as a slice): there is no second implementation of the architecture. Weights are inputs of the compiled
step, not baked into it, so one artifact serves every model file of the same shape and adds no memory.
Which artifact a model needs, where it is cached and when it is built: `llamaforge.generate.compiled`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CompileError
from .kv_cache import KVCache


# --------------------------------------------------------------------------------------------- tracing
class _DecodeStep(nn.Module):
    """forward(token [1, 1], span [S], k_0, v_0, ..., k_L, v_L, *weights) -> logits [1, vocab] float32.

    S - 1 is the new token's position. It travels as the length of a placeholder tensor because the compiled
    runner takes tensors only. The caches are the full [1, n_kv, max_len, D] tensors, written in place.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names, self.index, self.weights = weight_slots(model)

    def forward(self, token, span, *tensors):
        n_layers = self.model.config.num_hidden_layers
        kv, weights = tensors[:2 * n_layers], tensors[2 * n_layers:]
        pos = span.shape[0] - 1
        torch._check(pos >= 1)
        torch._check(pos < kv[0].shape[2])
        cache = KVCache.wrap(list(kv[0::2]), list(kv[1::2]))
        params = {name: weights[i] for name, i in zip(self.names, self.index)}
        logits = torch.func.functional_call(self.model, params, (token,),
                                            {"cache": cache, "input_pos": pos, "last_only": True})
        return logits[:, -1].float()


class _BatchDecodeStep(_DecodeStep):
    """forward(tokens [B, 1], positions [B], rows [B], span [S], *caches, *weights) -> logits [B, vocab] float32.

    One new token for each of B requests, each at its own position in its own cache row (the server's
    continuous batch); S = the furthest position + 1. The caches are the full [slots, n_kv, max_len, D] tensors.
    """

    def forward(self, tokens, positions, rows, span, *tensors):
        n_layers = self.model.config.num_hidden_layers
        kv, weights = tensors[:2 * n_layers], tensors[2 * n_layers:]
        torch._check(span.shape[0] <= kv[0].shape[2])
        cache = KVCache.wrap(list(kv[0::2]), list(kv[1::2]))
        params = {name: weights[i] for name, i in zip(self.names, self.index)}
        logits = torch.func.functional_call(self.model, params, (tokens,), {
            "cache": cache, "input_pos": positions, "rows": rows, "last_only": True, "span": span.shape[0]})
        return logits[:, -1].float()


def batch_path(path: Path) -> Path:
    """Where the batched step of the artifact at `path` lives (built together, batched one first)."""
    return path.with_name(f"{path.stem}-batch.pt2")


def weight_slots(model: nn.Module):
    """Every parameter and buffer by name, with shared tensors (a tied embedding / head) passed once."""
    names, index, weights, seen = [], [], [], {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen[key] = len(weights)
            weights.append(t.detach())
        names.append(name)
        index.append(seen[key])
    return names, index, weights


def build(model: nn.Module, out: Path, *, max_len: int = 64) -> Path:
    """Export and compile the decode steps of `model`: one stream into `out`, a batch beside it (`batch_path`).
    Both are written atomically, the batched one first, so `out` existing means both are there. Slow: ~2 min."""
    if next(model.parameters()).device.type != "cpu":
        raise CompileError("the compiled decode step is built for CPU models only")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        from torch.export import Dim  # imported here: the serving process never needs it
        model.inv_freq("cpu")  # computed before tracing, so it is a constant of the step and not traced state
        cache = model.new_cache(4, max_len)
        kv = [t for pair in zip(cache.k, cache.v) for t in pair]
        S, M = Dim("span", min=2, max=1 << 20), Dim("cache_len", min=3, max=1 << 20)
        B, R = Dim("batch", min=2, max=1 << 10), Dim("slots", min=2, max=1 << 12)
        step = _BatchDecodeStep(model).eval()
        example = (torch.zeros(3, 1, dtype=torch.long), torch.tensor([5, 9, 7]), torch.tensor([0, 2, 3]),
                   torch.empty(17, dtype=torch.uint8), *kv, *step.weights)
        dynamic = ({0: B}, {0: B}, {0: B}, {0: S}, (*[{0: R, 2: M}] * len(kv), *[None] * len(step.weights)))
        _export_compile(step, example, dynamic, batch_path(out))
        kv = [t[:1] for t in kv]
        step = _DecodeStep(model).eval()
        example = (torch.zeros(1, 1, dtype=torch.long), torch.empty(17, dtype=torch.uint8), *kv, *step.weights)
        dynamic = (None, {0: S}, (*[{2: M}] * len(kv), *[None] * len(step.weights)))
        _export_compile(step, example, dynamic, out)
    except Exception as e:  # export/inductor raise many types; the caller needs "it did not work, and why"
        raise CompileError(f"compiling the decode step failed: {type(e).__name__}: {e}") from e
    return out


def _export_compile(step: nn.Module, example: tuple, dynamic: tuple, out: Path) -> None:
    from torch._inductor import aoti_compile_and_package
    from torch.export import export
    from .._fs import atomic_file
    with atomic_file(out) as tmp:
        tmp.unlink()  # the packager writes the file itself (and wants the .pt2 suffix)
        pt2 = tmp.with_name(tmp.name + ".pt2")
        try:
            with torch.inference_mode(False), torch.no_grad():
                exported = export(step, example, dynamic_shapes=dynamic)
                aoti_compile_and_package(exported, package_path=str(pt2))
            os.replace(pt2, tmp)
        finally:
            pt2.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- running
class CompiledDecoder:
    """Runs the compiled steps: `step(token_id, cache, pos, row)` -> logits [vocab] float32 for one stream, and
    `step.batch(token_ids, cache, positions, rows)` -> logits [B, vocab] for several (None if not built)."""

    def __init__(self, model: nn.Module, path: Path):
        self.path = Path(path)
        self.kv_dtype = model.kv_dtype or torch.float32
        self.weights = weight_slots(model)[2]
        # The C++ runner directly: `torch._inductor.aoti_load_package` would import inductor's Python side.
        self._runner = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, -1)
        batch = batch_path(self.path)
        self._batch_runner = (torch._C._aoti.AOTIModelPackageLoader(str(batch), "model", False, 1, -1)
                              if batch.exists() else None)
        self._token = torch.zeros(1, 1, dtype=torch.long)
        self._span = torch.empty(1024, dtype=torch.uint8)
        self._key, self._tail = None, []
        self._batch_key, self._batch_tail = None, []

    def supports(self, cache: KVCache) -> bool:
        return (not cache.static and cache.dtype == self.kv_dtype and cache.k[0].device.type == "cpu"
                and cache.k[0].is_contiguous())

    def _span_of(self, n: int) -> torch.Tensor:
        if self._span.numel() < n:
            self._span = torch.empty(2 * n, dtype=torch.uint8)
        return self._span[:n]

    def __call__(self, token: int, cache: KVCache, pos: int, row: int = 0) -> torch.Tensor:
        if not 1 <= pos < cache.max_seq_len:
            raise ValueError(f"position {pos} is outside 1..{cache.max_seq_len - 1}")
        if self._key != (id(cache), row):  # the row's slice of each layer's cache, then the weights
            self._tail = [t[row:row + 1] for pair in zip(cache.k, cache.v) for t in pair] + self.weights
            self._key = (id(cache), row)
        self._token.fill_(token)
        return self._runner.run([self._token, self._span_of(pos + 1), *self._tail])[0][0]

    def batch(self, tokens: list[int], cache: KVCache, positions: list[int], rows: list[int]) -> torch.Tensor | None:
        if self._batch_runner is None or len(tokens) < 2:
            return None
        if not (len(tokens) == len(positions) == len(rows)) or len(set(rows)) != len(rows):
            raise ValueError("tokens, positions and rows must have one distinct row per token")
        top = max(positions)
        if min(positions) < 1 or top >= cache.max_seq_len or min(rows) < 0 or max(rows) >= cache.batch_size:
            raise ValueError(f"positions must be in 1..{cache.max_seq_len - 1} and rows in "
                             f"0..{cache.batch_size - 1}")
        if self._batch_key != id(cache):
            self._batch_tail = [t for pair in zip(cache.k, cache.v) for t in pair] + self.weights
            self._batch_key = id(cache)
        ins = [torch.tensor(tokens, dtype=torch.long)[:, None], torch.tensor(positions, dtype=torch.long),
               torch.tensor(rows, dtype=torch.long), self._span_of(top + 1)]
        return self._batch_runner.run(ins + self._batch_tail)[0]
