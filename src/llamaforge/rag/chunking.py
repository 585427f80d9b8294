"""Structure-aware chunking: Markdown sections and paragraphs first, then token-bounded windows with overlap.

1. The text is cut into blocks: paragraphs (blank-line separated), fenced code blocks whole, and - for Markdown -
   headings, which are not content but set the heading path ("Manual > Error codes") of the blocks below them.
2. Consecutive blocks under the same heading are packed into one chunk while it stays within `max_tokens`
   (counted in the embedding model's own tokens), so a chunk never mixes two sections.
3. A block longer than `max_tokens` is cut into windows of `max_tokens` that overlap by `overlap` tokens, at word
   boundaries.

Every chunk keeps its character span in the document text (`text[start:end]` is exactly the chunk) and its
heading path; the embedded text is the heading path followed by the chunk, so a passage keeps its context.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Callable, Sequence

DEFAULT_MAX_TOKENS = 160
DEFAULT_OVERLAP = 32

_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*#*[ \t]*$")
_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*$")
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_WORD = re.compile(r"\S+")


@dataclass
class Chunk:
    """A passage of a document: `text` == document_text[start:end]; `heading`: "A > B" path or ""."""

    text: str
    heading: str
    start: int
    end: int

    def embed_text(self) -> str:
        return f"{self.heading}\n\n{self.text}" if self.heading else self.text


@dataclass
class _Block:
    start: int
    end: int
    heading: str


def _lines(text: str):
    pos = 0
    for line in text.split("\n"):
        yield pos, line
        pos += len(line) + 1


def blocks(text: str, markdown: bool) -> list[_Block]:
    """Paragraph / code blocks of `text` with the heading path they sit under (headings only for Markdown)."""
    out: list[_Block] = []
    path: list[str] = []
    para: list[tuple[int, str]] = []   # (offset, line) of the paragraph being read
    fence: str | None = None

    def heading_path() -> str:
        return " > ".join(p for p in path if p)

    def close_para() -> None:
        if para:
            start = para[0][0]
            end = para[-1][0] + len(para[-1][1])
            _add(out, text, start, end, heading_path())
            para.clear()

    def set_heading(level: int, title: str) -> None:
        del path[level - 1:]
        path.extend([""] * (level - 1 - len(path)))
        path.append(title.strip())

    fence_start = 0
    for off, line in _lines(text):
        if fence is not None:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                _add(out, text, fence_start, off + len(line), heading_path())
                fence = None
            continue
        if markdown:
            m = _FENCE.match(line)
            if m:
                close_para()
                fence, fence_start = m.group(1), off
                continue
            m = _ATX.match(line)
            if m:
                close_para()
                set_heading(len(m.group(1)), m.group(2) or "")
                continue
            m = _SETEXT.match(line)
            if m and len(para) == 1:
                title = para.pop()[1]
                set_heading(1 if m.group(1)[0] == "=" else 2, title)
                continue
        if not line.strip():
            close_para()
        else:
            para.append((off, line))
    close_para()
    if fence is not None:   # an unclosed fence runs to the end of the document
        _add(out, text, fence_start, len(text), heading_path())
    return out


def _add(out: list[_Block], text: str, start: int, end: int, heading: str) -> None:
    seg = text[start:end]
    lead = len(seg) - len(seg.lstrip())
    trail = len(seg) - len(seg.rstrip())
    if end - trail > start + lead:
        out.append(_Block(start + lead, end - trail, heading))


def chunk_text(text: str, *, markdown: bool, token_counts: Callable[[Sequence[str]], list[int]],
               max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Chunks of `text` (see module docstring). `token_counts(words)` gives each word's length in tokens."""
    if max_tokens < 8:
        raise ValueError("max_tokens must be at least 8")
    overlap = max(0, min(overlap, max_tokens // 2))
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    counts = token_counts([text[s:e] for s, e in words]) if words else []
    starts = [s for s, _ in words]
    out: list[Chunk] = []
    cur: list[_Block] = []
    cur_tokens = 0

    def word_range(b: _Block) -> tuple[int, int]:
        return bisect.bisect_left(starts, b.start), bisect.bisect_left(starts, b.end)

    def flush() -> None:
        nonlocal cur, cur_tokens
        if cur:
            out.append(Chunk(text[cur[0].start:cur[-1].end], cur[0].heading, cur[0].start, cur[-1].end))
        cur, cur_tokens = [], 0

    for b in blocks(text, markdown):
        lo, hi = word_range(b)
        n = sum(counts[lo:hi])
        if cur and (cur[0].heading != b.heading or cur_tokens + n > max_tokens):
            flush()
        if n <= max_tokens:
            cur.append(b)
            cur_tokens += n
            continue
        flush()
        for ws, we in _windows(counts, lo, hi, max_tokens, overlap):
            s, e = words[ws][0], words[we - 1][1]
            out.append(Chunk(text[s:e], b.heading, s, e))
    flush()
    return out


def _windows(counts: list[int], lo: int, hi: int, max_tokens: int, overlap: int):
    """Word ranges [i, j) covering words lo..hi, each within max_tokens (a single longer word alone), the next
    starting `overlap` tokens before the previous end."""
    i = lo
    while i < hi:
        j, total = i, 0
        while j < hi and (j == i or total + counts[j] <= max_tokens):
            total += counts[j]
            j += 1
        yield i, j
        if j >= hi:
            return
        k, back = j, 0
        while k > i + 1 and back + counts[k - 1] <= overlap:
            k -= 1
            back += counts[k]
        i = k
