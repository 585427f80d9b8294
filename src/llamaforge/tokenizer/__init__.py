"""Tokenizers for every Llama generation, chat formats, streaming detokenization.

`load_tokenizer(path_or_gguf_metadata)` and `chat.chat_format_for(tokenizer)` are the entry points.
"""
from __future__ import annotations

from .base import StreamDecoder, Tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "load_tokenizer", "tokenizer_from_gguf_metadata", "chat_format_for"]


def __getattr__(name):
    # Lazy: importing llamaforge.tokenizer must not pull in tokenizers/tiktoken/sentencepiece/jinja2.
    if name in ("load_tokenizer", "tokenizer_from_gguf_metadata"):
        from . import load
        return getattr(load, name)
    if name == "chat_format_for":
        from .chat import chat_format_for
        return chat_format_for
    raise AttributeError(name)
