"""Read only the key/value metadata of a GGUF file (enough for a tokenizer), never the tensors.

The parsing is `llamaforge.gguf_header`'s, the same defensive reader the weights loader uses, stopped after the
key/value section: `llamaforge tokenize` on a multi-GB model touches a few MB of header and nothing else.
"""
from __future__ import annotations

from ..gguf_header import read_header


def read_gguf_metadata(path) -> dict:
    """The key/value dict of a GGUF file (arrays as lists). Raises ModelFormatError on a malformed file."""
    return read_header(path, tensors=False).metadata
