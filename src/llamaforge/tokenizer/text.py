"""Text helpers shared by every backend: input cleaning and splitting on special-token text."""
from __future__ import annotations

import re
from typing import Iterator, Mapping

_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str | bytes) -> str:
    """Make any input encodable: bytes are decoded as UTF-8 and lone surrogates become U+FFFD.

    Invalid UTF-8 byte sequences are replaced by U+FFFD (Python's "replace" policy), never raised.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise TypeError(f"text must be str or bytes, not {type(text).__name__}")
    return _SURROGATES.sub("\ufffd", text)


class SpecialSplitter:
    """Partition text into plain fragments and special-token ids.

    `always` tokens (user-defined, e.g. llama.cpp's USER_DEFINED type) are matched in every text; `control`
    tokens only when the caller allows special tokens, so user text can never produce a control id.
    Longer tokens win when two start at the same place.
    """

    def __init__(self, control: Mapping[str, int], always: Mapping[str, int] | None = None):
        self.control = dict(control)
        self.always = dict(always or {})
        self._pat_all = self._compile({**self.control, **self.always})
        self._pat_always = self._compile(self.always)

    @staticmethod
    def _compile(tokens: Mapping[str, int]):
        names = sorted((t for t in tokens if t), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, names))) if names else None

    def split(self, text: str, allow_special: bool) -> Iterator[str | int]:
        """Yield str fragments (non-empty) and int ids in order."""
        pat = self._pat_all if allow_special else self._pat_always
        if pat is None:
            if text:
                yield text
            return
        table = {**self.control, **self.always} if allow_special else self.always
        pos = 0
        for m in pat.finditer(text):
            if m.start() > pos:
                yield text[pos:m.start()]
            yield table[m.group(0)]
            pos = m.end()
        if pos < len(text):
            yield text[pos:]
