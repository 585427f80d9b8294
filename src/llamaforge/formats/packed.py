"""Packed weights straight from GGUF blocks: the formats side of the in-memory fast path (`model.quant`).

GGUF Q4_0 / Q4_1 blocks are groups of 32 already, so they become the int4 layers' (q, scale, zero) without
re-quantizing (Q4_1 stores w = d * q + m, hence scale = d and zero = m + 8 d; ggml `dequantize_row_q4_1`); Q8_0
becomes int8 rows in chunks. `load_gguf_quantized` builds a whole `Llama` this way without ever materialising
float32 weights, which keeps loading fast and the memory peak low. The packed layers themselves and the float
quantizers live in `model.quant`; this module only reads files.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ModelFormatError
from ..model.quant import GROUP, int4_from_float, int8_from_float, quantize_model, release_free_memory
from .gguf import file_type_name
from .gguf_names import hf_to_gguf_name

_GGML_Q4_0, _GGML_Q4_1, _GGML_Q8_0 = 2, 3, 8


def _blocks(gf, name: str, block_bytes: int, rows: slice = slice(None)) -> torch.Tensor:
    """Raw blocks of rows of a 2-D GGUF tensor as uint8 [n, K/32, block_bytes].

    Read with plain file reads rather than through the memory map: mapped file pages count as resident memory
    for as long as the map lives, read pages only sit in the OS page cache. Offsets were validated by read_gguf.
    """
    info = gf.tensors[name]
    N, K = info.shape
    start, stop, _ = rows.indices(N)
    row_bytes = K // GROUP * block_bytes
    out = torch.empty((stop - start, K // GROUP, block_bytes), dtype=torch.uint8)
    with open(gf.path, "rb") as f:
        f.seek(info.offset + start * row_bytes)
        if f.readinto(out.numpy().reshape(-1)) != out.numel():
            raise ModelFormatError(gf.path, f"tensor {name!r} is truncated (file changed while loading?)")
    return out


def _half(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per block -> their little-endian float16 value as float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def int4_from_gguf(gf, name: str):
    """(q, scale, zero) for a GGUF tensor; Q4_0 / Q4_1 blocks convert exactly, other types are re-quantized."""
    t = gf.tensors[name].ggml_type
    if t == _GGML_Q4_1:
        b = _blocks(gf, name, 20)                       # d f16, m f16, 16 bytes of nibbles
        d, m, qs = _half(b[..., 0:2]), _half(b[..., 2:4]), b[..., 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], -1)         # element j in the low nibble, j+16 in the high one
        return q.reshape(q.shape[0], -1), d, m + 8 * d
    if t == _GGML_Q4_0:
        b = _blocks(gf, name, 18)                       # d f16, 16 bytes of nibbles; w = d * (q - 8)
        d, qs = _half(b[..., 0:2]), b[..., 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], -1)
        return q.reshape(q.shape[0], -1), d, torch.zeros_like(d)
    return int4_from_float(gf.dequantize(name, torch.float32))


def int8_from_gguf(gf, name: str, rows_per_chunk: int = 1024):
    """(q int8 [N,K], scale [N]); Q8_0 is decoded in row chunks so no full float32 copy is ever held."""
    info = gf.tensors[name]
    if info.ggml_type != _GGML_Q8_0:
        return int8_from_float(gf.dequantize(name, torch.float32))
    N = info.shape[0]
    q = torch.empty(info.shape, dtype=torch.int8)
    scale = torch.empty(N)
    for r in range(0, N, rows_per_chunk):
        c = _blocks(gf, name, 34, slice(r, r + rows_per_chunk))  # d f16, 32 x int8
        w = (_half(c[..., 0:2])[..., None] * c[..., 2:].contiguous().view(torch.int8).float()).flatten(1)
        q[r:r + rows_per_chunk], scale[r:r + rows_per_chunk] = int8_from_float(w)
    return q, scale


class _GGUFSource:
    """Weights straight from a GGUF file's blocks (HF names mapped to GGUF names; q/k rows un-permuted)."""

    def __init__(self, gf, config):
        self.gf, self.config = gf, config
        self.file_type = file_type_name(gf)

    def _name(self, hf: str) -> str:
        g = hf_to_gguf_name(hf)
        if g not in self.gf.tensors:
            raise ModelFormatError(self.gf.path, f"missing tensor {g!r}")
        return g

    def get(self, i: int, block: str, proj: str, quant: str):
        name = self._name(f"model.layers.{i}.{block}.{proj}.weight")
        if quant == "q4":
            parts = int4_from_gguf(self.gf, name)
        else:
            parts = (*int8_from_float(self.gf.dequantize(name, torch.float32)), None)
        if proj in ("q_proj", "k_proj"):
            from ..model.rope import unpermute_qk
            n = self.config.num_attention_heads if proj == "q_proj" else self.config.num_key_value_heads
            if parts[0].shape[0] % (2 * n):
                raise ModelFormatError(self.gf.path, f"tensor {name!r} has {parts[0].shape[0]} rows, not "
                                                     f"divisible into {n} heads of even size")
            parts = tuple(None if p is None else unpermute_qk(p, n) for p in parts)
        return parts

    def int8(self, name: str):
        return int8_from_gguf(self.gf, self._name(name))

    def fill(self, model, name):
        t = self.gf.dequantize(self._name(name), torch.float32)
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        expected = tuple(getattr(mod, attr).shape)
        if tuple(t.shape) != expected:
            raise ModelFormatError(self.gf.path, f"tensor {name!r} has shape {list(t.shape)}, expected "
                                                 f"{list(expected)}")
        setattr(mod, attr, nn.Parameter(t, requires_grad=False))


def load_gguf_quantized(gf, config, quant: str, device="cpu"):
    """A `Llama` built on the meta device and filled straight from GGUF blocks (no float32 copy of the weights)."""
    from ..model.llama import Llama
    # Skip the initialisers: they are wasted work here, and Embedding's normal_ on the meta device imports
    # torch._dynamo (about 75 MB of resident memory for nothing).
    with torch.device("meta"), _no_init():
        model = Llama(config)
    model = quantize_model(model, quant, _GGUFSource(gf, config), device=device)
    release_free_memory()
    return model.to(device)


@contextlib.contextmanager
def _no_init():
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved
