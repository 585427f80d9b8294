"""GGUF (v2/v3) files: validated tensor table, dequantization and the GGUF -> HF tensor-name table.

The header itself is parsed by `llamaforge.gguf_header` (the one GGUF header reader, shared with the tokenizer),
which checks every count, length and dimension against the file length before anything is allocated. This module
adds what only weights need: each tensor's type, block size, alignment and byte range checked against the data
section, then tensor bytes read through a read-only memory map. The `gguf` package supplies the numpy
dequantizers of the k-quant types.

Format reference: ggml `docs/gguf.md`; the checks mirror llama.cpp `ggml/src/gguf.cpp` and `tests/test-gguf.cpp`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import ModelFormatError
from ..gguf_header import GGUFHeader, is_gguf, read_header
from .gguf_names import gguf_to_hf_name, hf_to_gguf_name

__all__ = ["GGUFFile", "TensorInfo", "TENSOR_TYPES", "FILE_TYPES", "read_gguf", "is_gguf", "gguf_config",
           "iter_gguf_state_dict", "file_type_name", "gguf_to_hf_name", "hf_to_gguf_name", "write_gguf"]

# ggml tensor types we can turn into floats: id -> (name, elements per block, bytes per block).
TENSOR_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry. `shape` is in PyTorch order (GGUF stores dims innermost-first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int          # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return TENSOR_TYPES[self.ggml_type][0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class GGUFFile:
    """A validated GGUF file: `.version`, `.metadata` (key -> plain Python value), `.value_types`
    (key -> (type name, element type name or None)), `.tensors` (name -> TensorInfo, file order),
    `.alignment`, `.data_offset`. Tensor bytes are read lazily through a read-only memory map."""

    def __init__(self, path: Path, version: int, metadata: dict, value_types: dict, tensors: dict,
                 alignment: int, data_offset: int, file_size: int):
        self.path = path
        self.version = version
        self.metadata = metadata
        self.value_types = value_types
        self.tensors = tensors
        self.alignment = alignment
        self.data_offset = data_offset
        self.file_size = file_size
        self._mm: np.memmap | None = None

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    def _error(self, reason: str) -> ModelFormatError:
        return ModelFormatError(self.path, reason)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 numpy view into the file (no copy)."""
        info = self._info(name)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
            if self._mm.shape[0] != self.file_size:
                raise self._error("file changed size while being read")
        # A plain ndarray view: numpy's memmap subclass costs a Python call per slice in gguf's dequantizers.
        return self._mm[info.offset:info.offset + info.nbytes].view(np.ndarray)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise self._error(f"no tensor named {name!r}") from None

    def dequantize(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor as a new torch tensor of `dtype`, shape `info.shape` (PyTorch order).

        Decoded in row chunks straight into the output, so the only full-size allocation is the result.
        """
        info = self._info(name)
        raw = self.raw(name)
        ncols = info.shape[-1]
        nrows = info.numel // ncols
        rows = raw.reshape(nrows, info.nbytes // nrows)
        out = torch.empty((nrows, ncols), dtype=dtype)
        step = max(1, _CHUNK_VALUES // ncols)
        for r in range(0, nrows, step):
            out[r:r + step] = torch.from_numpy(_decode_rows(rows[r:r + step], info.ggml_type))
        return out.reshape(info.shape)

    def close(self) -> None:
        self._mm = None


_CHUNK_VALUES = 1 << 22   # values decoded per step (16 MiB of float32)


def _decode_rows(rows: np.ndarray, ggml_type: int) -> np.ndarray:
    """uint8 rows [n, row_bytes] of one ggml type -> float32 [n, values per row] (a new array)."""
    tname = TENSOR_TYPES[ggml_type][0]
    if tname == "F32":
        return np.array(rows.view("<f4"))  # copy: the map is read-only and must not be aliased
    if tname == "F16":
        return rows.view("<f2").astype(np.float32)
    if tname == "BF16":
        # bfloat16 is the high half of a float32: widen by shifting (numpy has no bfloat16 dtype).
        return (rows.view("<u2").astype(np.uint32) << 16).view(np.float32)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    return dequantize(rows, GGMLQuantizationType(ggml_type))


# --------------------------------------------------------------------------------------------- reading
def _validate_tensors(h: GGUFHeader) -> dict[str, TensorInfo]:
    """Header tensor entries -> TensorInfo, after checking types, block sizes, alignment and data bounds."""
    def fail(reason: str) -> ModelFormatError:
        return ModelFormatError(h.path, reason)

    data_len = h.file_size - h.data_offset
    tensors: dict[str, TensorInfo] = {}
    for t in h.tensor_infos:
        if not t.dims:
            raise fail(f"tensor {t.name!r} has 0 dimensions (a weight has at least one)")
        if t.ggml_type not in TENSOR_TYPES:
            try:
                from gguf import GGMLQuantizationType
                tname = f"{GGMLQuantizationType(t.ggml_type).name} (id {t.ggml_type})"
            except (ImportError, ValueError):
                tname = f"id {t.ggml_type}"
            supported = ", ".join(sorted(v[0] for v in TENSOR_TYPES.values()))
            raise fail(f"tensor {t.name!r} has unknown or unsupported type {tname}; supported: {supported}")
        tname, block, bsize = TENSOR_TYPES[t.ggml_type]
        if t.dims[0] % block:
            raise fail(f"tensor {t.name!r} row length {t.dims[0]} is not a multiple of the {tname} block size "
                       f"{block}")
        nbytes = t.numel // block * bsize
        if t.offset % h.alignment:
            raise fail(f"tensor {t.name!r} offset {t.offset} is not a multiple of the alignment {h.alignment}")
        if t.offset > data_len or nbytes > data_len - t.offset:
            raise fail(f"tensor {t.name!r} ({nbytes} bytes at data offset {t.offset}) extends past the end of the "
                       f"file (data section is {data_len} bytes)")
        tensors[t.name] = TensorInfo(t.name, tuple(int(d) for d in reversed(t.dims)), t.ggml_type,
                                     h.data_offset + t.offset, nbytes)
    # Tensors may come in any order but must not share bytes.
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise fail(f"tensors {n0!r} and {n1!r} overlap in the file")
    return tensors


def read_gguf(path) -> GGUFFile:
    """Open and validate a GGUF file. Raises `ModelFormatError(path, reason)` for anything malformed."""
    h = read_header(path)
    return GGUFFile(h.path, h.version, h.metadata, h.value_types, _validate_tensors(h), h.alignment,
                    h.data_offset, h.file_size)


# --------------------------------------------------------------------------------------------- to a model
def gguf_config(gf: GGUFFile):
    """ModelConfig from the file's metadata; vocabulary size and rope factors taken from the tensors."""
    from ..config import ModelConfig
    emb = gf.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelFormatError(gf.path, "missing tensor 'token_embd.weight'")
    if len(emb.shape) != 2:
        raise ModelFormatError(gf.path, f"tensor 'token_embd.weight' has shape {list(emb.shape)}, expected 2-D")
    meta = gf.metadata
    cfg = ModelConfig.from_gguf(meta, vocab_size=emb.shape[0], path=gf.path)
    if "llama.vocab_size" in meta and meta["llama.vocab_size"] != emb.shape[0]:
        raise ModelFormatError(gf.path, f"llama.vocab_size is {meta['llama.vocab_size']} but token_embd.weight "
                                        f"has {emb.shape[0]} rows")
    tied = "output.weight" not in gf.tensors
    cfg = cfg.replace(tie_word_embeddings=tied, attention_bias="blk.0.attn_q.bias" in gf.tensors,
                      mlp_bias="blk.0.ffn_gate.bias" in gf.tensors)
    check_gguf_tensors(gf, cfg)
    ff = gf.tensors.get("rope_freqs.weight")
    if ff is not None:
        if ff.numel != cfg.head_dim // 2:  # checked before decoding: a crafted table must not be read whole
            raise ModelFormatError(gf.path, f"tensor 'rope_freqs.weight' has {ff.numel} values, expected "
                                            f"head_dim / 2 = {cfg.head_dim // 2}")
        factors = tuple(gf.dequantize("rope_freqs.weight").flatten().tolist())
        from ..config import RopeScaling
        from ..errors import ConfigError
        try:
            cfg = cfg.replace(rope_scaling=RopeScaling("factors", freq_factors=factors))
        except ConfigError as e:
            raise ModelFormatError(gf.path, e.reason) from None
    return cfg


def check_gguf_tensors(gf: GGUFFile, config) -> None:
    """Every architecture number of `config` agrees with the tensors present (layer count = blk.N found, each
    shape as the numbers say), before any weight is decoded or any module built."""
    from .architecture import check_tensor_shapes
    shapes = {}
    for name, info in gf.tensors.items():
        try:
            hf = gguf_to_hf_name(name)
        except KeyError:
            raise ModelFormatError(gf.path, f"unexpected tensor {name!r} for a llama model") from None
        if hf is not None:
            if hf in shapes:
                raise ModelFormatError(gf.path, f"tensor {name!r} names the same weight ({hf}) as another tensor")
            shapes[hf] = info.shape
    try:
        check_tensor_shapes(config, shapes, gf.path, "gguf")
    except ModelFormatError as e:
        raise ModelFormatError(gf.path, _gguf_tensor_names(e.reason)) from None


def _gguf_tensor_names(reason: str) -> str:
    """Add the GGUF spelling of the first HF tensor name in a message (users look files up with gguf tools)."""
    import re
    m = re.search(r"'((?:model|lm_head)[\w.]*)'", reason)
    try:
        g = hf_to_gguf_name(m.group(1)) if m else None
    except KeyError:
        g = None
    return f"{reason} (GGUF tensor {g!r})" if g else reason


def iter_gguf_state_dict(gf: GGUFFile, config, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) pairs, dequantized to `dtype`, q/k rows converted to HF layout (once, here)."""
    for name in gf.tensors:
        try:
            hf = gguf_to_hf_name(name)
        except KeyError:
            raise ModelFormatError(gf.path, f"unexpected tensor {name!r} for a llama model") from None
        if hf is None:
            continue
        t = gf.dequantize(name, torch.float32)
        if ".self_attn.q_proj." in hf or ".self_attn.k_proj." in hf:
            n = config.num_attention_heads if ".q_proj." in hf else config.num_key_value_heads
            if t.shape[0] % (2 * n):
                raise ModelFormatError(gf.path, f"tensor {name!r} has {t.shape[0]} rows, not divisible into "
                                                f"{n} heads of even size")
            from ..model.rope import unpermute_qk
            t = unpermute_qk(t, n)
        yield hf, t.to(dtype)


# llama.cpp's `llama_ftype` values (general.file_type) -> names; a table here rather than importing the `gguf`
# package at load time (it pulls in numpy, yaml and more: ~30 ms and a few MB resident for one enum).
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0",
}


def file_type_name(gf: GGUFFile) -> str:
    """Human name of the file's weight type ("Q4_1", "F16", ...): general.file_type, else the commonest 2-D type."""
    ft = gf.metadata.get("general.file_type")
    if isinstance(ft, int) and ft in FILE_TYPES:
        return FILE_TYPES[ft]
    counts: dict[str, int] = {}
    for t in gf.tensors.values():
        if len(t.shape) == 2:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.numel
    return max(counts, key=counts.get) if counts else "unknown"


def write_gguf(*args, **kwargs):
    """Write a GGUF file; see `llamaforge.formats.gguf_write.write_gguf`."""
    from .gguf_write import write_gguf as _write
    return _write(*args, **kwargs)
