"""SentencePiece backend: a `tokenizer.model` protobuf, or a ModelProto built from a GGUF "llama" vocab."""
from __future__ import annotations

import re

import sentencepiece as spm

from ..errors import TokenizerError
from .common import FragmentTokenizer
from .common import read_tokenizer_file

SPACE = "\u2581"  # "▁", SentencePiece's visible space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
UNKNOWN_TEXT = "\u2585".encode()  # llama.cpp prints an unknown token as "▅"


class SentencePieceTokenizer(FragmentTokenizer):
    """Encodes with the `sentencepiece` library; decodes from a per-id byte table.

    The model's dummy prefix ("▁" before the text) is added to every fragment between special tokens, as
    SentencePiece and llama.cpp do; decode drops the space of the first text-producing token (same rule in
    the stream decoder).
    """

    def __init__(self, processor: spm.SentencePieceProcessor, *, bos_id=None, eos_id=None, add_bos=None,
                 add_eos=False, chat_template=None, source: str = "sentencepiece"):
        self._sp = processor
        self._sp_cont = None
        self._proto = b""
        self.source = source
        n = processor.get_piece_size()
        table: list[bytes] = []
        control: dict[str, int] = {}
        for i in range(n):
            piece = processor.id_to_piece(i)
            if processor.is_control(i):
                control[piece] = i
                table.append(b"")
            elif processor.is_unknown(i):
                control[piece] = i
                table.append(UNKNOWN_TEXT)
            elif processor.is_byte(i):
                table.append(bytes([_byte_value(piece)]))
            else:
                table.append(piece.replace(SPACE, " ").encode("utf-8"))
        # The dummy prefix shows as a leading "▁" when encoding a bare word.
        probe = processor.encode("a", out_type=str)
        self.strip_leading_space = bool(probe) and probe[0].startswith(SPACE)
        if bos_id is None and processor.bos_id() >= 0:
            bos_id = processor.bos_id()
        if eos_id is None and processor.eos_id() >= 0:
            eos_id = processor.eos_id()
        self._setup(token_bytes=table, control=control, bos_id=bos_id, eos_id=eos_id,
                    add_bos=True if add_bos is None else add_bos, add_eos=add_eos, chat_template=chat_template)

    @classmethod
    def from_file(cls, path, **kw) -> "SentencePieceTokenizer":
        return cls.from_proto(read_tokenizer_file(path), source=str(path), **kw)

    @classmethod
    def from_proto(cls, data: bytes, **kw) -> "SentencePieceTokenizer":
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError, ValueError) as e:
            raise TokenizerError(f"invalid SentencePiece model: {e}") from None
        tok = cls(sp, **kw)
        tok._proto = bytes(data)
        return tok

    def _encode_fragment(self, text: str, prefix: bool = True) -> list[int]:
        if prefix or not self.strip_leading_space:
            return self._sp.encode(text)
        if self._sp_cont is None:
            # Same model with normalizer_spec.add_dummy_prefix = false: protobuf merges a repeated embedded
            # message field, so appending {3: {3: 0}} to the serialized ModelProto overrides just that flag.
            sp = spm.SentencePieceProcessor()
            sp.LoadFromSerializedProto(self._proto + b"\x1a\x02\x18\x00")
            self._sp_cont = sp
        return self._sp_cont.encode(text)


def _byte_value(piece: str) -> int:
    """Value of a byte-fallback piece "<0xAB>"; anything else is a malformed vocabulary."""
    m = _BYTE_PIECE.fullmatch(piece)
    if m:
        return int(m.group(1), 16)
    raise TokenizerError(f"byte token {piece!r} is not of the form <0xXX>")
