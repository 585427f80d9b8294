"""GPT-2 byte-level alphabet: each byte is shown as a printable character in vocab strings ("Ġ" = space)."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    # Printable Latin-1 bytes map to themselves; the rest are shifted to U+0100.. in byte order (GPT-2's table).
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def piece_to_bytes(piece: str) -> bytes:
    """Bytes of a byte-level vocab string; characters outside the alphabet keep their own UTF-8 bytes."""
    table = char_to_byte()
    out = bytearray()
    for ch in piece:
        b = table.get(ch)
        if b is None:
            out += ch.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)
