"""`load_tokenizer`: one entry point for every tokenizer source, told apart by content, not file name."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from ..errors import ModelFormatError, TokenizerError
from .base import Tokenizer

MAX_TOKENIZER_FILE_BYTES = 256 << 20
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} [0-9]+\r?$")


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], path=None) -> Tokenizer:
    """Tokenizer from decoded GGUF key/values (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""
    from .gguf_vocab import tokenizer_from_gguf_metadata as build
    return build(metadata, path)


def sniff_tokenizer_file(path: Path) -> str:
    """"gguf", "json", "tiktoken" or "sentencepiece", from the first bytes of the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    if head[:4] == b"GGUF":
        return "gguf"
    if not head:
        raise TokenizerError(f"{path}: empty file")
    if head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"{":  # JSON, with or without a UTF-8 BOM
        return "json"
    first = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first):
        return "tiktoken"
    # A SentencePiece ModelProto starts with field 1 (pieces), wire type 2: byte 0x0A.
    if head[:1] == b"\x0a":
        return "sentencepiece"
    raise TokenizerError(f"{path}: not a known tokenizer format (GGUF, tokenizer.json, SentencePiece or "
                         f"tiktoken tokenizer.model)")


def _from_dir(path: Path) -> Tokenizer:
    for name in ("tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
        if (path / name).is_file():
            return load_tokenizer(path / name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return load_tokenizer(ggufs[0])
    raise TokenizerError(f"{path}: no tokenizer.json, tokenizer.model or single .gguf file in this directory")


def load_tokenizer(source) -> Tokenizer:
    """Load a tokenizer from GGUF metadata (a dict), a GGUF file (metadata only, weights untouched), a
    tokenizer.json, either kind of tokenizer.model (SentencePiece protobuf or Llama 3 tiktoken), or a
    directory holding one of these."""
    if isinstance(source, Mapping):
        return tokenizer_from_gguf_metadata(source)
    path = Path(source)
    if path.is_dir():
        return _from_dir(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file or directory")
    kind = sniff_tokenizer_file(path)
    if kind != "gguf" and path.stat().st_size > MAX_TOKENIZER_FILE_BYTES:
        # Read whole into memory below: refuse e.g. a weights file handed over by mistake.
        raise TokenizerError(f"{path}: {path.stat().st_size} bytes is too large for a tokenizer file")
    if kind == "gguf":
        from .gguf_meta import read_gguf_metadata
        try:
            meta = read_gguf_metadata(path)
        except ModelFormatError as e:
            raise TokenizerError(str(e)) from None
        return tokenizer_from_gguf_metadata(meta, path)
    if kind == "json":
        from .hf import HFTokenizer
        return HFTokenizer.from_file(path)
    if kind == "tiktoken":
        from .tiktoken import TiktokenTokenizer
        return TiktokenTokenizer.from_file(path)
    from .sentencepiece import SentencePieceTokenizer
    tok = SentencePieceTokenizer.from_file(path)
    cfg = path.parent / "tokenizer_config.json"
    if cfg.is_file():
        from .hf import _chat_template, _read_json
        tok.chat_template = _chat_template(_read_json(cfg) or {})
    return tok
