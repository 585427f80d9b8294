"""Serialize a SentencePiece ModelProto (sentencepiece_model.proto) without the protobuf package.

Only the fields a BPE model with byte fallback needs; field numbers follow sentencepiece_model.proto.
"""
from __future__ import annotations

import struct
from typing import Sequence

# SentencePiece.Type values; GGUF's token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_UNIGRAM, MODEL_BPE = 1, 2


def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # protobuf encodes negative int32 as 10-byte two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _len_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(int(value))


def _piece(text: str, score: float, ptype: int) -> bytes:
    return (_len_field(1, text.encode("utf-8")) + _key(2, 5) + struct.pack("<f", float(score))
            + _int_field(3, ptype))


def model_proto(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                model_type: int = MODEL_BPE, byte_fallback: bool = True, add_dummy_prefix: bool = True,
                remove_extra_whitespaces: bool = False, unk_id: int = 0, bos_id: int = -1,
                eos_id: int = -1) -> bytes:
    """ModelProto bytes: pieces + trainer spec (model type, byte fallback, ids) + identity normalizer."""
    body = bytearray()
    for text, score, ptype in zip(pieces, scores, types):
        body += _len_field(1, _piece(text, score, ptype))
    trainer = (_int_field(3, model_type) + _int_field(4, len(pieces)) + _int_field(35, int(byte_fallback))
               + _int_field(40, unk_id) + _int_field(41, bos_id) + _int_field(42, eos_id) + _int_field(43, -1))
    body += _len_field(2, trainer)
    normalizer = (_len_field(1, b"identity") + _int_field(3, int(add_dummy_prefix))
                  + _int_field(4, int(remove_extra_whitespaces)) + _int_field(5, 1))
    body += _len_field(3, normalizer)
    return bytes(body)
