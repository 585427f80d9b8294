"""The one GGUF (v2/v3) header reader: magic, version, key/value metadata and tensor-info entries.

Both readers of GGUF files stand on it: `formats.gguf.read_gguf` (weights: it adds the tensor types, block sizes
and data bounds) and `tokenizer.gguf_meta.read_gguf_metadata` (a vocabulary: metadata only, tensors untouched).
It sits at the bottom floor because it knows nothing of models or tokenizers, only of the file layout.

Defensive by construction: every count, length, dimension and type id is checked against the bytes left in the
file *before* anything is allocated, so a header claiming 2^60 array elements fails at once with
`ModelFormatError(path, reason)`. The file is read through a read-only memory map: only the header pages are
touched, however large the weights behind it.

Format reference: ggml `docs/gguf.md`; the checks mirror llama.cpp `ggml/src/gguf.cpp` and `tests/test-gguf.cpp`.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                      # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 1               # arrays of arrays are not used by Llama files; refused rather than recursed
_INT64_MAX = 2**63 - 1

# GGUF metadata value types: id -> (name, struct format or None for variable size).
VALUE_TYPES = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<B"),
    8: ("string", None), 9: ("array", None), 10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
# Fixed-size array elements: id -> struct format letter (little-endian, read in one unpack call).
_ARRAY_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}


@dataclass(frozen=True)
class RawTensorInfo:
    """One tensor-info entry as the header states it: dims innermost-first (GGUF order), the ggml type id
    (not yet checked against a table of known types) and the offset relative to the data section."""

    name: str
    dims: tuple[int, ...]
    numel: int
    ggml_type: int
    offset: int


@dataclass
class GGUFHeader:
    """A validated header. `tensor_infos` is empty (and `data_offset` None) when read with `tensors=False`."""

    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[str, str | None]]   # key -> (type name, element type name for arrays)
    alignment: int
    file_size: int
    n_tensors: int
    tensor_infos: list[RawTensorInfo] = field(default_factory=list)
    data_offset: int | None = None


class _Cursor:
    """Bounds-checked little-endian reader over the mapped file."""

    def __init__(self, buf, size: int, path):
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def fail(self, reason: str) -> ModelFormatError:
        return ModelFormatError(self.path, reason)

    @property
    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, file has {self.left} left")

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
        if n > self.left:
            raise self.fail(f"{what}: string length {n} exceeds the {self.left} bytes left in the file")
        b = self.buf[self.pos:self.pos + n]  # slicing the mmap copies out a bytes object
        self.pos += n
        # Lossless for the rare token that is not valid UTF-8; such a str can be turned back into its bytes.
        return b.decode("utf-8", errors="surrogateescape")


def _read_value(c: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype not in VALUE_TYPES:
        raise c.fail(f"key {key!r}: unknown value type id {vtype}")
    fmt = VALUE_TYPES[vtype][1]
    if fmt is not None:
        v = c.unpack(fmt, f"value of {key!r}")
        if vtype == _BOOL:
            if v not in (0, 1):
                raise c.fail(f"key {key!r}: boolean byte is {v}, not 0 or 1")
            return bool(v)
        return v
    if vtype == _STRING:
        return c.string(f"value of {key!r}")
    # Array: element type, count, elements.
    if depth >= MAX_ARRAY_DEPTH:
        raise c.fail(f"key {key!r}: nested arrays are not supported")
    etype = c.u32(f"array type of {key!r}")
    if etype not in VALUE_TYPES:
        raise c.fail(f"key {key!r}: unknown array element type id {etype}")
    count = c.u64(f"array length of {key!r}")
    if etype in _ARRAY_FORMATS:
        esize = struct.calcsize("<" + _ARRAY_FORMATS[etype])
        if count > c.left // esize:
            raise c.fail(f"key {key!r}: array of {count} elements needs {count * esize} bytes, "
                         f"file has {c.left} left")
        values = list(struct.unpack_from(f"<{count}{_ARRAY_FORMATS[etype]}", c.buf, c.pos))
        c.pos += count * esize
        if etype == _BOOL:
            if any(v > 1 for v in values):
                raise c.fail(f"key {key!r}: boolean array holds a byte other than 0 or 1")
            return [bool(v) for v in values]
        return values
    if etype == _STRING:
        if count > c.left // 8:  # each string takes at least its 8-byte length
            raise c.fail(f"key {key!r}: array of {count} strings cannot fit in the {c.left} bytes left")
        return _string_array(c, count, key)
    raise c.fail(f"key {key!r}: nested arrays are not supported")


def _string_array(c: _Cursor, count: int, key: str) -> list[str]:
    """`count` length-prefixed strings: the vocabulary's hot loop (~50k-250k tokens and merges), so the checks
    are inlined and an error message is only built when one is raised."""
    buf, pos, size, out = c.buf, c.pos, c.size, []
    unpack_len = struct.Struct("<Q").unpack_from
    for i in range(count):
        if size - pos < 8:
            c.pos = pos
            c.need(8, f"length of element {i} of {key!r}")
        n = unpack_len(buf, pos)[0]
        pos += 8
        if n > size - pos:
            raise c.fail(f"element {i} of {key!r}: string length {n} exceeds the {size - pos} bytes left in the file")
        out.append(buf[pos:pos + n].decode("utf-8", errors="surrogateescape"))
        pos += n
    c.pos = pos
    return out


def parse_header(path: Path, buf, size: int, *, tensors: bool = True) -> GGUFHeader:
    """Parse and validate the header in `buf` (the file's first `size` bytes, e.g. a memory map).

    tensors=False stops after the key/value section (what a tokenizer needs)."""
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
    if n_kv > c.left // 13:
        raise c.fail(f"header claims {n_kv} metadata keys, more than the file can hold")
    if n_tensors > c.left // 24:
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
        if vtype == _ARRAY:
            etype = VALUE_TYPES[struct.unpack_from("<I", buf, start)[0]][0]
        value_types[key] = (VALUE_TYPES[vtype][0], etype)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in metadata and value_types["general.alignment"][0] != "uint32":
        raise c.fail("general.alignment must be a uint32")
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment must be a power of two, got {alignment!r}")
    header = GGUFHeader(path, version, metadata, value_types, alignment, size, n_tensors)
    if not tensors:
        return header

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
        header.tensor_infos.append(RawTensorInfo(name, tuple(dims), numel, ttype, offset))
    header.data_offset = c.pos + (-c.pos) % alignment
    if header.data_offset > size and n_tensors:
        raise c.fail("truncated: the file ends before its tensor data section")
    return header


def read_header(path, *, tensors: bool = True) -> GGUFHeader:
    """Open a GGUF file and validate its header (see `parse_header`). Raises `ModelFormatError(path, reason)`
    for anything malformed and for paths that are not regular files (a FIFO would block, a device never end)."""
    path = Path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):
            raise ModelFormatError(path, "not a regular file")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ModelFormatError(path, "file is empty")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return parse_header(path, mm, size, tensors=tensors)
    except ModelFormatError:
        raise
    except IsADirectoryError:
        raise ModelFormatError(path, "is a directory, not a GGUF file") from None
    except FileNotFoundError:
        raise ModelFormatError(path, "no such file") from None
    except OSError as e:
        raise ModelFormatError(path, f"cannot read: {e.strerror or e}") from None


def is_gguf(path) -> bool:
    """True if `path` is a regular file starting with the GGUF magic (never blocks on a FIFO)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
