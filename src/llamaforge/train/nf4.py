"""4-bit NormalFloat (NF4) weights for QLoRA, in pure PyTorch (runs on CPU; no bitsandbytes needed).

NF4 (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", sec. 3 and appendix E): 16 values
that are quantiles of N(0, 1), normalised to [-1, 1], with an exact zero. Weights are split into blocks of 64,
each block is divided by its absolute maximum ("absmax", kept in float32) and every value is replaced by the
index of the nearest code. Two 4-bit indices are packed per byte. Double quantization of the absmax values is
not done here: it saves 0.37 bit/parameter, which matters on a 65B model, not on the CPU-sized ones we train.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidRequestError

# The NF4 code book as published with the paper (bitsandbytes `create_normal_map(offset=0.9677083)`).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

DEFAULT_BLOCK_SIZE = 64


def quantize_nf4(weight: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (any shape, numel divisible by block_size and even) -> (packed uint8 [numel/2], absmax f32 [blocks])."""
    n = weight.numel()
    if block_size <= 0 or n % block_size or block_size % 2:
        raise InvalidRequestError(f"NF4 needs an even block size dividing the tensor size; got {n} elements, "
                                  f"block size {block_size}", field="block_size")
    blocks = weight.detach().reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    code = NF4_CODE.to(weight.device)
    # Nearest code value: bucketize against the midpoints between consecutive codes.
    idx = torch.bucketize(scaled.reshape(-1), (code[1:] + code[:-1]) / 2).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype=torch.float32,
                   block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """Inverse of `quantize_nf4` (up to the 4-bit rounding)."""
    idx = torch.stack(((packed >> 4) & 0xF, packed & 0xF), dim=1).reshape(-1).long()
    values = NF4_CODE.to(packed.device)[idx].reshape(-1, block_size) * absmax[:, None]
    return values.reshape(shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4; dequantized per forward (gradients reach the input)."""

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_nf4", packed)
        self.register_buffer("absmax", absmax)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = DEFAULT_BLOCK_SIZE) -> "NF4Linear":
        packed, absmax = quantize_nf4(linear.weight, block_size)
        return cls(packed, absmax, linear.in_features, linear.out_features, linear.bias, block_size,
                   compute_dtype=linear.weight.dtype)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.weight_nf4, self.absmax, (self.out_features, self.in_features),
                              dtype or self.compute_dtype, self.block_size)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor; used by merge and by code that inspects `.weight`)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 block={self.block_size}"
