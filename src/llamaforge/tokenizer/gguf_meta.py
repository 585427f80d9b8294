"""Read only the key/value metadata of a GGUF file (enough for a tokenizer), never the tensors.

Defensive: magic, version, counts and every length are checked against the file size before use.
The formats package has the full reader; this one exists so `llamaforge tokenize` on a multi-GB model
reads a few MB and nothing else.
"""
from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
       12: "<f8"}
_STRING, _ARRAY = 8, 9
MAX_KV = 1 << 20


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ModelFormatError(self.path, f"truncated GGUF metadata at byte {self.pos} (needs {n} more bytes)")

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        self.need(n)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        self.need(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            v = self.unpack(_SCALARS[vtype])
            return bool(v) if vtype == 7 else v
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth > 2:
                raise ModelFormatError(self.path, "GGUF arrays nested too deeply")
            etype = self.unpack("<I")
            count = self.unpack("<Q")
            if etype in _NP:
                width = np.dtype(_NP[etype]).itemsize
                self.need(count * width)
                arr = np.frombuffer(self.buf, dtype=_NP[etype], count=count, offset=self.pos)
                self.pos += count * width
                out = arr.tolist()
                return [bool(x) for x in out] if etype == 7 else out
            if etype == _STRING:
                # Every string needs at least its 8-byte length: reject absurd counts before looping.
                self.need(count * 8)
                return [self.string() for _ in range(count)]
            if etype == _ARRAY:
                self.need(count * 12)
                return [self.value(_ARRAY, depth + 1) for _ in range(count)]
            raise ModelFormatError(self.path, f"unknown GGUF array element type {etype}")
        raise ModelFormatError(self.path, f"unknown GGUF value type {vtype}")


def read_gguf_metadata(path) -> dict:
    """The key/value dict of a GGUF file (arrays as lists). Raises ModelFormatError on a malformed file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if path.stat().st_size < 24:
                raise ModelFormatError(path, "file too small to be GGUF")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return _parse(mm, path)
    except OSError as e:
        raise ModelFormatError(path, f"cannot read: {e.strerror or e}") from None


def _parse(buf, path) -> dict:
    cur = _Cursor(buf, path)
    cur.need(4)
    if bytes(buf[:4]) != b"GGUF":
        raise ModelFormatError(path, "not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ModelFormatError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    cur.unpack("<Q")  # tensor count: not needed here
    n_kv = cur.unpack("<Q")
    if n_kv > MAX_KV or n_kv * 13 > cur.size:
        raise ModelFormatError(path, f"GGUF key/value count {n_kv} exceeds the file")
    meta: dict = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("<I")
        if key in meta:
            raise ModelFormatError(path, f"duplicate GGUF key {key!r}")
        meta[key] = cur.value(vtype)
    return meta
