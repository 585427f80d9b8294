"""Defensive GGUF (v2/v3) reader, dequantization and the GGUF -> HF tensor-name table.

The header is parsed here, by hand, and every count, length, dimension, type id, alignment and offset is checked
against the file length *before* anything is allocated: a header that claims 2^60 array elements fails at once
with `ModelFormatError`. Only then are tensor bytes touched, through a read-only memory map. The `gguf` package
supplies the format constants, block sizes and the numpy dequantizers.

Format reference: ggml `docs/gguf.md`; the checks mirror llama.cpp `ggml/src/gguf.cpp` and `tests/test-gguf.cpp`.
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                      # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 1               # arrays of arrays are not used by Llama files; refused rather than recursed
_INT64_MAX = 2**63 - 1

# GGUF metadata value types: id -> (name, struct format or None for variable size).
_VALUE_TYPES = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<B"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8", 11: "<i8",
                12: "<f8"}

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


# --------------------------------------------------------------------------------------------- header parsing
class _Cursor:
    """Bounds-checked little-endian reader over the mapped file."""

    def __init__(self, buf, size: int, path):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def fail(self, reason: str) -> ModelFormatError:
        return ModelFormatError(self.path, reason)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                            f"file has {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what}: string length {n} exceeds the {self.size - self.pos} bytes left in the file")
        b = self.buf[self.pos:self.pos + n]  # slicing the mmap copies out a bytes object
        self.pos += n
        # Lossless for the rare token that is not valid UTF-8; such a str can be turned back into its bytes.
        return b.decode("utf-8", errors="surrogateescape")


def _read_value(c: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype not in _VALUE_TYPES:
        raise c.fail(f"key {key!r}: unknown value type id {vtype}")
    name, fmt = _VALUE_TYPES[vtype]
    if fmt is not None:
        v = c.unpack(fmt, f"value of {key!r}")
        if vtype == 7:
            if v not in (0, 1):
                raise c.fail(f"key {key!r}: boolean byte is {v}, not 0 or 1")
            return bool(v)
        return v
    if vtype == 8:
        return c.string(f"value of {key!r}")
    # Array: element type, count, elements.
    if depth >= MAX_ARRAY_DEPTH:
        raise c.fail(f"key {key!r}: nested arrays are not supported")
    etype = c.u32(f"array type of {key!r}")
    if etype not in _VALUE_TYPES:
        raise c.fail(f"key {key!r}: unknown array element type id {etype}")
    count = c.u64(f"array length of {key!r}")
    left = c.size - c.pos
    if etype in _NUMPY_TYPES or etype == 7:
        esize = 1 if etype == 7 else np.dtype(_NUMPY_TYPES[etype]).itemsize
        if count > left // esize:
            raise c.fail(f"key {key!r}: array of {count} elements needs {count * esize} bytes, "
                         f"file has {left} left")
        # Copy the bytes out first: a numpy view would pin the mmap open.
        data = bytes(c.buf[c.pos:c.pos + count * esize])
        arr = np.frombuffer(data, dtype=_NUMPY_TYPES.get(etype, "<u1"), count=count)
        c.pos += count * esize
        if etype == 7:
            if count and int(arr.max()) > 1:
                raise c.fail(f"key {key!r}: boolean array holds a byte other than 0 or 1")
            return [bool(x) for x in arr.tolist()]
        return arr.tolist()
    if etype == 8:
        if count > left // 8:  # each string takes at least its 8-byte length
            raise c.fail(f"key {key!r}: array of {count} strings cannot fit in the {left} bytes left")
        return [c.string(f"element {i} of {key!r}") for i in range(count)]
    raise c.fail(f"key {key!r}: nested arrays are not supported")


def _parse(path: Path, buf, size: int) -> GGUFFile:
    c = _Cursor(buf, size, path)
    if size < 4:
        raise c.fail(f"file is too small to be GGUF ({size} bytes)")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise c.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    c.pos = 4
    version = c.u32("version")
    if version == 1:
        raise c.fail("GGUF version 1 is not supported (only versions 2 and 3)")
    if version not in SUPPORTED_VERSIONS and struct.unpack("<I", struct.pack(">I", version))[0] in SUPPORTED_VERSIONS:
        raise c.fail("big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise c.fail(f"unsupported GGUF version {version} (only versions 2 and 3)")
    n_tensors = c.u64("tensor count")
    n_kv = c.u64("metadata key count")
    # Minimum on-disk sizes: a kv is 8 (key len) + 4 (type) + 1; a tensor info is 8 + 4 + 4 + 8 (zero dims).
    if n_kv > (size - c.pos) // 13:
        raise c.fail(f"header claims {n_kv} metadata keys, more than the file can hold")
    if n_tensors > (size - c.pos) // 24:
        raise c.fail(f"header claims {n_tensors} tensors, more than the file can hold")

    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[str, str | None]] = {}
    for i in range(n_kv):
        key = c.string(f"key #{i}")
        if key in metadata:
            raise c.fail(f"duplicate metadata key {key!r}")
        vtype = c.u32(f"value type of {key!r}")
        start = c.pos
        metadata[key] = _read_value(c, vtype, key)
        etype = None
        if vtype == 9:
            etype = _VALUE_TYPES[struct.unpack_from("<I", buf, start)[0]][0]
        value_types[key] = (_VALUE_TYPES[vtype][0], etype)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and value_types["general.alignment"][0] != "uint32":
        raise c.fail("general.alignment must be a uint32")
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment must be a power of two, got {alignment!r}")

    raw_infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"name of tensor #{i}")
        if name in names:
            raise c.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = c.u32(f"dimension count of {name!r}")
        if n_dims > MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = [c.u64(f"dimension {d} of {name!r}") for d in range(n_dims)]
        numel = 1
        for d in dims:
            if d == 0:
                raise c.fail(f"tensor {name!r} has a zero dimension {dims}")
            numel *= d
            if numel > _INT64_MAX:
                raise c.fail(f"tensor {name!r} dimensions {dims} overflow 64 bits")
        ttype = c.u32(f"type of {name!r}")
        offset = c.u64(f"offset of {name!r}")
        raw_infos.append((name, dims, numel, ttype, offset))

    data_offset = c.pos + (-c.pos) % alignment
    if data_offset > size and n_tensors:
        raise c.fail("truncated: the file ends before its tensor data section")
    data_len = size - data_offset
    tensors: dict[str, TensorInfo] = {}
    for name, dims, numel, ttype, offset in raw_infos:
        if ttype not in TENSOR_TYPES:
            try:
                from gguf import GGMLQuantizationType
                tname = f"{GGMLQuantizationType(ttype).name} (id {ttype})"
            except (ImportError, ValueError):
                tname = f"id {ttype}"
            supported = ", ".join(sorted(v[0] for v in TENSOR_TYPES.values()))
            raise c.fail(f"tensor {name!r} has unknown or unsupported type {tname}; supported: {supported}")
        tname, block, bsize = TENSOR_TYPES[ttype]
        if dims[0] % block:
            raise c.fail(f"tensor {name!r} row length {dims[0]} is not a multiple of the {tname} block size {block}")
        nbytes = numel // block * bsize
        if offset % alignment:
            raise c.fail(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        if offset > data_len or nbytes > data_len - offset:
            raise c.fail(f"tensor {name!r} ({nbytes} bytes at data offset {offset}) extends past the end of the "
                         f"file (data section is {data_len} bytes)")
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), ttype, data_offset + offset, nbytes)
    # Tensors may come in any order but must not share bytes.
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise c.fail(f"tensors {n0!r} and {n1!r} overlap in the file")
    return GGUFFile(path, version, metadata, value_types, tensors, alignment, data_offset, size)


def read_gguf(path) -> GGUFFile:
    """Open and validate a GGUF file. Raises `ModelFormatError(path, reason)` for anything malformed."""
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise ModelFormatError(path, "not a regular file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFormatError(path, "file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(path, mm, size)
    except ModelFormatError:
        raise
    except IsADirectoryError:
        raise ModelFormatError(path, "is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise ModelFormatError(path, "no such file") from None
    except OSError as e:
        raise ModelFormatError(path, f"cannot read: {e.strerror or e}") from None


def is_gguf(path) -> bool:
    """True if `path` is a file starting with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- names
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# Tensors that carry no weights of ours: rope_freqs becomes config, attn_rot_embd is an old precomputed table.
_NON_WEIGHTS = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight")


def gguf_to_hf_name(name: str) -> str | None:
    """HF parameter name for a GGUF tensor name; None for tensors that are not model weights."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if _NON_WEIGHTS.fullmatch(name):
        return None
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{int(m.group(1))}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise KeyError(name)


def hf_to_gguf_name(name: str) -> str:
    """GGUF tensor name for an HF parameter name (inverse of `gguf_to_hf_name`)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        for g, h in _LAYER_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    raise KeyError(name)


# --------------------------------------------------------------------------------------------- to a model
def gguf_config(gf: GGUFFile):
    """ModelConfig from the file's metadata; vocabulary size and rope factors taken from the tensors."""
    from ..config import ModelConfig
    emb = gf.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelFormatError(gf.path, "missing tensor 'token_embd.weight'")
    if len(emb.shape) != 2:
        raise ModelFormatError(gf.path, f"tensor 'token_embd.weight' has shape {list(emb.shape)}, expected 2-D")
    freq_factors = None
    if "rope_freqs.weight" in gf.tensors:
        freq_factors = tuple(gf.dequantize("rope_freqs.weight").flatten().tolist())
    meta = gf.metadata
    cfg = ModelConfig.from_gguf(meta, vocab_size=emb.shape[0], freq_factors=freq_factors, path=gf.path)
    if "llama.vocab_size" in meta and meta["llama.vocab_size"] != emb.shape[0]:
        raise ModelFormatError(gf.path, f"llama.vocab_size is {meta['llama.vocab_size']} but token_embd.weight "
                                        f"has {emb.shape[0]} rows")
    tied = "output.weight" not in gf.tensors
    return cfg.replace(tie_word_embeddings=tied, attention_bias="blk.0.attn_q.bias" in gf.tensors,
                       mlp_bias="blk.0.ffn_gate.bias" in gf.tensors)


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


def load_gguf_state_dict(path_or_file, dtype: torch.dtype = torch.float32):
    """(ModelConfig, state_dict with HF names) from a GGUF file; weights dequantized to `dtype`."""
    gf = path_or_file if isinstance(path_or_file, GGUFFile) else read_gguf(path_or_file)
    config = gguf_config(gf)
    return config, dict(iter_gguf_state_dict(gf, config, dtype))


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
