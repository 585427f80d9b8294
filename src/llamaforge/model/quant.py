"""Weights kept quantized in memory, behind one interface: `quantize_model(model, quant, source=None)`.

Formats (`quant`):
  "none" - dense weights in the model's dtype (the float32 reference).
  "bf16" - dense bfloat16 weights and activations (oneDNN bf16 GEMMs on AVX-512 BF16 CPUs and on GPUs).
  "int8" - int8 weights, one scale per output row (`torch._weight_int8pack_mm`).
  "q4"   - 4-bit weights in groups of 32 with a scale and a zero point per group
           (`aten._weight_int4pack_mm_for_cpu`); the tied embedding / lm_head is int8.
  The packed kernels take bfloat16 inputs; everything else (residual stream, norms, attention, KV cache) stays
  float32.
           GGUF Q4_0 / Q4_1 blocks are 32-element groups already, so they convert without re-quantizing.

The packed kernels compute w = (q - 8) * scale + zero per group (the "tinygemm" convention); Q4_1 stores
w = d * q + m, hence scale = d and zero = m + 8 d (ggml `dequantize_row_q4_1`).
With a GGUF file at hand, `formats.packed.load_gguf_quantized` builds the model straight from the file's blocks
without ever materialising float32 weights, which keeps loading fast and peak memory low.
"""
from __future__ import annotations

import ctypes
import functools
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidRequestError, ModelFormatError

QUANT_TYPES = ("none", "bf16", "int8", "q4")
GROUP = 32            # int4 group size = GGUF block size
ACT_DTYPE = torch.bfloat16


# --------------------------------------------------------------------------------------------- choosing
def default_quant(device="cpu", file_type: str | None = None) -> str:
    """The default in-memory format: the fastest whose perplexity stays within 1% of float32 (bench/NOTES.md).

    It never throws away precision the file has: 4-bit GGUF files (Q4_0 / Q4_1) run as "q4", other quantized
    GGUF files as "int8", float checkpoints stay dense ("none"). The int4 kernel is CPU-only: GPUs get "bf16".
    """
    ft = (file_type or "").upper()
    if not ft or ft in ("F32", "F16", "BF16"):
        return "none"
    if torch.device(device).type != "cpu":
        return "bf16"
    return "q4" if ft in ("Q4_0", "Q4_1") else "int8"


def resolve_quant(quant, dtype=None, device="cpu", file_type: str | None = None) -> str:
    """Normalise a user's `quant` (None, "auto" or a name from QUANT_TYPES) for a file of `file_type`.

    None means "auto" unless an explicit dtype was asked for, in which case the dense weights in that dtype are
    kept ("none"): asking for float32 should give float32.
    """
    if quant is None:
        quant = "auto" if dtype is None else "none"
    if not isinstance(quant, str):
        raise InvalidRequestError(f"quant must be a string, got {type(quant).__name__}", field="quant")
    q = quant.lower()
    if q in ("auto", "default"):
        return default_quant(device, file_type)
    q = {"int4": "q4", "q4_0": "q4", "q4_1": "q4", "bfloat16": "bf16", "float32": "none", "f32": "none",
         "fp32": "none", "q8_0": "int8"}.get(q, q)
    if q not in QUANT_TYPES:
        raise InvalidRequestError(f"unknown quant {quant!r}; choose one of auto, {', '.join(QUANT_TYPES)}",
                                  field="quant")
    if q == "q4" and torch.device(device).type != "cpu":
        raise InvalidRequestError("quant 'q4' uses a CPU kernel; use 'bf16' or 'int8' on GPU", field="quant")
    return q


# --------------------------------------------------------------------------------------------- layers
class Int4Linear(nn.Module):
    """y = x @ W.T (+ b) with W stored as packed 4-bit groups of 32 along the input dimension."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None,
                 act_dtype: torch.dtype = ACT_DTYPE):
        """q: [N, K] integers 0..15; scale, zero: [N, K/32] so that w = (q - 8) * scale + zero."""
        super().__init__()
        N, K = q.shape
        if K % GROUP or scale.shape != (N, K // GROUP) or zero.shape != scale.shape:
            raise ValueError(f"Int4Linear: q {tuple(q.shape)}, scale {tuple(scale.shape)}, zero "
                             f"{tuple(zero.shape)} do not describe groups of {GROUP}")
        self.in_features, self.out_features, self.act_dtype = K, N, act_dtype
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 1))
        # [K/32, N, 2]: the layout the kernel reads.
        self.register_buffer("scales_zeros", torch.stack([scale.t(), zero.t()], -1).to(act_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(act_dtype))
        self.out_dtype = None  # None: the input's dtype; ACT_DTYPE keeps the kernel's output (see quantize_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        min_rows = getattr(_DENSE, "min_rows", None)
        if min_rows is not None and x2.shape[0] >= min_rows and not torch.compiler.is_compiling() \
                and self.can_dequantize():
            y = self._dense_matmul(x2)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(self.act_dtype), self.packed, GROUP,
                                                           self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(self.out_dtype or x.dtype)

    def can_dequantize(self) -> bool:
        """Whether `dequantized` can read this layer's packed buffer (its layout is known on this CPU)."""
        bn = int4pack_block_rows()
        return bn is not None and self.out_features % bn == 0 and self.packed.dtype == torch.uint8 \
            and tuple(self.packed.shape) == (self.out_features, self.in_features // 2)

    def dequantized(self, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """Float32 weight rows [begin, end) (multiples of the packing's block rows): (q - 8) * scale + zero,
        the values the packed kernel multiplies by."""
        bn, K = int4pack_block_rows(), self.in_features
        end = self.out_features if end is None else end
        b = self.packed.view(self.out_features // bn, K, bn // 2)[begin // bn:end // bn]
        w = _unpack_int4(b, torch.float32)
        sz = self.scales_zeros[:, begin:end].float()            # [K/32, n, 2]
        scale, zero = sz[..., 0].t(), sz[..., 1].t()            # [n, K/32]
        w = w.view(end - begin, K // GROUP, GROUP)
        w.mul_(scale[..., None]).add_((zero - 8 * scale)[..., None])
        return w.view(end - begin, K)

    def _dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T in float32 over weights dequantized in row tiles of at most DENSE_TILE elements. Fewer than
        DENSE_PAD_ROWS rows are padded to that many: below it the BLAS picks other kernels, and a row's numbers
        would depend on how many rows came with it."""
        x = x.float()
        m = x.shape[0]
        if m < DENSE_PAD_ROWS:
            return self._dense_matmul(torch.cat([x, x.new_zeros(DENSE_PAD_ROWS - m, x.shape[1])]))[:m]
        bn = int4pack_block_rows()
        rows = max(bn, DENSE_TILE // self.in_features // bn * bn)
        if rows >= self.out_features:
            return F.linear(x, self.dequantized())
        y = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
        for a in range(0, self.out_features, rows):
            b = min(a + rows, self.out_features)
            y[:, a:b] = F.linear(x, self.dequantized(a, b))
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={GROUP}"


# --------------------------------------------------------------------------------------------- dense matmuls
# Scoring (perplexity, log-likelihood tasks, prompt logprobs) and long prompt prefills run hundreds of rows per
# matmul. There the packed int4 kernel, built for a few rows, costs ~3x a float32 GEMM over weights dequantized
# on the fly (SmolLM2, 2048 rows: 11.8 s vs 3.7-4.2 s for all int4 layers, of which 0.2 s is dequantizing).
# It is opt-in, per thread: the same position must go through the same path whenever it is computed (a decode
# step always takes the packed kernel), so the engine uses it only for whole prompts it chose it for
# (generate/engine.py) and scorers for forwards nothing decodes from.
DENSE_MIN_ROWS = 64            # below this the fixed dequantization cost outweighs the GEMM's gain
DENSE_PAD_ROWS = 16            # fewer rows are padded (see Int4Linear._dense_matmul)
DENSE_TILE = 1024 * 1024       # weight elements dequantized at once (4 MB of float32: stays in cache)
_DENSE = threading.local()


@contextmanager
def dense_matmuls(min_rows: int = DENSE_MIN_ROWS):
    """Within the block (this thread only), int4 layers given at least `min_rows` rows run as float32 GEMMs
    over their dequantized weights (see the comment above for when that is allowed)."""
    prev = getattr(_DENSE, "min_rows", None)
    _DENSE.min_rows = min_rows
    try:
        yield
    finally:
        _DENSE.min_rows = prev


def dense_rows_invariant(model) -> bool:
    """Whether the dense path gives each row the same numbers whatever other rows (at least DENSE_PAD_ROWS of
    them) share its GEMM, for every int4 layer shape of `model`: the condition for using it in prefill, where
    the same position may be computed in chunks of different sizes (a repeated prompt, another chunk budget).
    Probed on random data of each shape; False when the model has no int4 layers the path can read."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers or not all(m.can_dequantize() for m in layers):
        return False
    return all(_rows_invariant(n, k) for n, k in sorted({(m.out_features, m.in_features) for m in layers}))


@functools.cache
def _rows_invariant(n: int, k: int) -> bool:
    g = torch.Generator().manual_seed(n * 7919 + k)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(300, k, generator=g)
    full = F.linear(x, w)
    for a, m in ((0, DENSE_PAD_ROWS), (5, DENSE_PAD_ROWS + 1), (37, 31), (3, 64), (100, 100), (1, 255)):
        if not torch.equal(F.linear(x[a:a + m], w), full[a:a + m]):
            return False
    return True


@functools.cache
def int4pack_block_rows() -> int | None:
    """Output rows per block of torch's CPU int4 packing (it depends on the kernel torch picked for this CPU),
    found by packing a probe and reading it back; None when no known layout matches (no dense path then)."""
    N, K = 256, 64
    q = (torch.arange(N * K, dtype=torch.int32).reshape(N, K) * 7 + torch.arange(N, dtype=torch.int32)[:, None]) % 16
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, AttributeError):
        return None
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (N, K // 2):
        return None
    for bn in (8, 16, 32, 64, 128, 256):
        if torch.equal(_unpack_int4(packed.view(N // bn, K, bn // 2), torch.int32), q):
            return bn
    return None


def _unpack_int4(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit values [blocks * bn, K] of packed bytes viewed as [blocks, K, bn/2]. torch's CPU packing stores,
    per block of bn output rows and per input column, bn/2 bytes: the low nibbles are rows 0..bn/2-1 of the
    block, the high nibbles rows bn/2..bn-1 (`int4pack_block_rows` finds bn)."""
    blocks, K, half = b.shape
    w = torch.empty((blocks, 2, half, K), dtype=dtype)
    w[:, 0].copy_((b & 15).transpose(1, 2))
    w[:, 1].copy_((b >> 4).transpose(1, 2))
    return w.view(blocks * 2 * half, K)


class Int8Linear(nn.Module):
    """y = (x @ q.T) * scale with q int8 [N, K] and one scale per output row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 act_dtype: torch.dtype = ACT_DTYPE):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.act_dtype = act_dtype
        self.register_buffer("qweight", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(act_dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(act_dtype))
        self.out_dtype = None  # as Int4Linear.out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.act_dtype)
        if x2.is_cuda:  # no fused CUDA kernel in core torch: dequantize on the fly
            y = F.linear(x2, self.qweight.to(self.act_dtype)) * self.scale
        else:
            y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(self.out_dtype or x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Embedding(nn.Module):
    """Embedding rows stored as int8 with one scale per row; can share storage with a tied Int8Linear."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, act_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.act_dtype = act_dtype
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized table (a copy): for code that reads `embed_tokens.weight`, e.g. for dtype and device."""
        return self.qweight.to(self.act_dtype) * self.scale[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.act_dtype) * self.scale[ids][..., None]


# --------------------------------------------------------------------------------------------- quantizers
def int4_from_float(w: torch.Tensor):
    """Asymmetric 4-bit groups of 32 (min/max per group) -> (q [N,K] uint8, scale, zero [N,K/32])."""
    N, K = w.shape
    if K % GROUP:
        raise ModelFormatError(None, f"a {N}x{K} weight cannot be packed as 4-bit: its row length is not a "
                                     f"multiple of {GROUP}; use quant='int8' or 'bf16'")
    g = w.float().reshape(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.uint8).reshape(N, K)
    return q, scale, lo + 8 * scale


def int8_from_float(w: torch.Tensor):
    """Symmetric int8 per output row -> (q [N,K] int8, scale [N] float32)."""
    w = w.float()
    scale = (w.abs().amax(-1) / 127).clamp_min(1e-12)
    return (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


# --------------------------------------------------------------------------------------------- whole model
_QKV, _GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def quantize_model(model, quant, source=None, *, device="cpu"):
    """Convert a `Llama` to the in-memory format `quant` (see module docstring); returns the model.

    `source` supplies the packed weights: None takes them from the model's own float weights; the formats floor
    passes one that reads a file's blocks (`formats.packed`: GGUF Q4_0 / Q4_1 convert without re-quantizing).
    A source has `file_type` (the file's weight type or None, for quant="auto"), `get(layer, block, proj,
    quant)` -> (q, scale, zero | None), `int8(name)` -> (q, scale) and `fill(model, name)` for float tensors
    left on the meta device. q/k/v and gate/up are fused into one matmul each at the same time (inference only:
    training code should load with quant="none").
    """
    source = _ModelSource(model) if source is None else source
    quant = resolve_quant(quant, None, device, source.file_type)
    if quant == "none":
        return model
    model.eval()
    if quant == "bf16":
        model.to(torch.bfloat16)
        for layer in model.model.layers:
            _fuse_dense(layer)
        model._quant = quant
        return model
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        get = lambda owner, block, n: _checked(source.get(i, block, n, quant), owner, n, i)  # noqa: E731
        attn.qkv_proj = _packed(quant, [get(attn, "self_attn", n) for n in _QKV], attn, _QKV)
        attn.o_proj = _packed(quant, [get(attn, "self_attn", "o_proj")], attn, ("o_proj",))
        mlp.gate_up_proj = _packed(quant, [get(mlp, "mlp", n) for n in _GATE_UP], mlp, _GATE_UP)
        mlp.down_proj = _packed(quant, [get(mlp, "mlp", "down_proj")], mlp, ("down_proj",))
        # gate/up and down hand back the kernels' bf16: no float32 copy of the widest activation,
        # [tokens, 2 x intermediate], which sets the memory peak of a long prefill (SiLU itself stays float32,
        # see MLP.forward; the residual add widens down_proj's output).
        mlp.gate_up_proj.out_dtype = mlp.down_proj.out_dtype = ACT_DTYPE
        for n in _QKV:
            delattr(attn, n)
        for n in _GATE_UP:
            delattr(mlp, n)
        release_free_memory()  # per layer: otherwise glibc keeps every layer's temporaries (+200 MB peak)
    # Embedding and lm_head: int8 rows (also for "q4": the logits are what perplexity sees first).
    q, s = source.int8("model.embed_tokens.weight")
    model.model.embed_tokens = Int8Embedding(q, s)
    if model.config.tie_word_embeddings:
        model.lm_head = Int8Linear(q, s)
        model.lm_head.qweight = model.model.embed_tokens.qweight      # one copy of the table
    else:
        model.lm_head = Int8Linear(*source.int8("lm_head.weight"))
    # What is left (norms) stays float32, and so do the residual stream, attention and the KV cache: only the
    # packed matmuls take bfloat16 inputs. On CPU, bf16 SDPA is ~7x slower than float32 at decode sizes, and
    # the float32 residual keeps perplexity closer to the reference (bench/NOTES.md).
    for name, p in list(model.named_parameters()):
        if p.is_meta:
            source.fill(model, name)
    # Keys/values are stored in bf16 (half the cache memory, same decode speed) and widened for attention.
    model.kv_dtype = ACT_DTYPE
    model._quant = quant
    return model


def _checked(parts, owner, proj: str, layer: int):
    """The source tensor must have the shape the architecture expects (error names tensor and both shapes)."""
    expected = tuple(getattr(owner, proj).weight.shape)
    if tuple(parts[0].shape) != expected:
        raise ModelFormatError(None, f"tensor 'model.layers.{layer}.*.{proj}.weight' has shape "
                                     f"{list(parts[0].shape)}, expected {list(expected)}")
    return parts


def _packed(quant: str, parts, owner, names):
    """One quantized linear from row-stacked parts [(q, scale, zero | None, bias | None), ...]."""
    biases = [getattr(getattr(owner, n, None), "bias", None) for n in names]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach().float() if b is not None else torch.zeros(p[0].shape[0]) for b, p in zip(biases, parts)])
    if bias is not None and bias.is_meta:
        raise ModelFormatError(None, "quantizing a model with unloaded biases")
    if quant == "q4":
        return Int4Linear(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                          torch.cat([p[2] for p in parts]), bias)
    return Int8Linear(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), bias)


def _fuse_dense(layer) -> None:
    """bf16: fused dense projections (one GEMM for q/k/v and one for gate/up)."""
    attn, mlp = layer.self_attn, layer.mlp
    for owner, names, fused in ((attn, _QKV, "qkv_proj"), (mlp, _GATE_UP, "gate_up_proj")):
        mods = [getattr(owner, n) for n in names]
        lin = nn.Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=mods[0].bias is not None,
                        device=mods[0].weight.device, dtype=mods[0].weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.cat([m.weight for m in mods]))
            if lin.bias is not None:
                lin.bias.copy_(torch.cat([m.bias for m in mods]))
        setattr(owner, fused, lin.requires_grad_(False))
        for n in names:
            delattr(owner, n)


class _ModelSource:
    """Weights from the model's own (float) linears."""

    file_type = None

    def __init__(self, model):
        self.model = model

    def _weight(self, name: str) -> torch.Tensor:
        w = self.model.get_parameter(name)
        if w.is_meta:
            raise ModelFormatError(None, f"cannot quantize {name!r}: its weights are not loaded")
        return w.detach()

    def get(self, i: int, block: str, proj: str, quant: str):
        w = self._weight(f"model.layers.{i}.{block}.{proj}.weight")
        return int4_from_float(w) if quant == "q4" else (*int8_from_float(w), None)

    def int8(self, name: str):
        return int8_from_float(self._weight(name))

    def fill(self, model, name):  # nothing to fill from: every weight is already loaded
        raise ModelFormatError(None, f"parameter {name!r} is not loaded")


def release_free_memory() -> None:
    """Hand the loader's freed temporaries back to the OS (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
