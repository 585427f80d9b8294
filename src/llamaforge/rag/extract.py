"""Text out of the files a collection ingests: plain text, Markdown, HTML (text only) and PDF (pypdf).

Every failure is a `DocumentError(path, reason)`, so one bad file is reported by name while the rest ingest.
HTML is turned into Markdown-like text (headings as `#` lines, one paragraph per block element) so the chunker
sees its structure; scripts, styles, navigation, headers, footers and forms are dropped. A PDF's pages become
sections named "page N", so a citation can point at a page.
"""
from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from ..errors import LlamaforgeError

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".mdown": "markdown",
                 ".rst": "text", ".html": "html", ".htm": "html", ".xhtml": "html", ".pdf": "pdf"}
MAX_PDF_PAGES = 5000
MAX_TEXT_CHARS = 50_000_000   # after extraction: a small compressed PDF can expand a lot


class DocumentError(LlamaforgeError):
    """One file could not be ingested: unreadable, binary, encrypted, malformed, too large or unsupported."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass
class Extracted:
    """The text of one document. kind: "markdown" (structure in `#` headings) or "text"; title: for display."""

    text: str
    kind: str
    title: str | None = None


def kind_for(path: str | Path) -> str | None:
    """The document kind a file name implies ("text", "markdown", "html", "pdf"), or None if unsupported."""
    return TEXT_SUFFIXES.get(Path(str(path)).suffix.lower())


def extract(data: bytes, path: str | Path, kind: str | None = None) -> Extracted:
    """The text of a file's bytes. `kind` defaults to the one its name implies."""
    kind = kind or kind_for(path)
    if kind is None:
        raise DocumentError(path, f"unsupported file type {Path(str(path)).suffix or '(no suffix)'!r}; "
                                  f"supported: {', '.join(sorted(TEXT_SUFFIXES))}")
    if kind == "pdf":
        out = _pdf(data, path)
    else:
        text = decode_text(data, path)
        out = _html(text) if kind == "html" else Extracted(text, "markdown" if kind == "markdown" else "text")
    if len(out.text) > MAX_TEXT_CHARS:
        raise DocumentError(path, f"more than {MAX_TEXT_CHARS:,} characters of text")
    if not out.text.strip():
        raise DocumentError(path, "no text found")
    return out


def decode_text(data: bytes, path) -> str:
    """UTF-8 (a BOM allowed) or BOM-marked UTF-16; binary data and other encodings are refused."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16").replace("\r\n", "\n")
        except UnicodeDecodeError:
            raise DocumentError(path, "not valid UTF-16 text") from None
    head = data[:8192]
    if b"\x00" in head:
        raise DocumentError(path, "looks like a binary file (NUL bytes), not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DocumentError(path, f"not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") \
            from None
    controls = sum(1 for ch in text[:8192] if ord(ch) < 32 and ch not in "\n\r\t\f")
    if controls > max(8, len(text[:8192]) // 50):
        raise DocumentError(path, "looks like a binary file (control characters), not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


# ------------------------------------------------------------------------------------------------ HTML
_DROP = {"script", "style", "nav", "header", "footer", "aside", "noscript", "template", "svg", "form", "button",
         "iframe", "object", "select", "canvas", "menu", "head"}
_BLOCK = {"p", "div", "section", "article", "main", "li", "ul", "ol", "table", "tr", "blockquote", "pre", "br",
          "dd", "dt", "dl", "figure", "figcaption", "hr", "td", "th", "body", "html"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _HtmlText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.cur: list[str] = []
        self.skip: list[str] = []      # open dropped elements
        self.heading = 0
        self.title: list[str] = []
        self.in_title = False
        self.pre = 0

    def _flush(self) -> None:
        text = "".join(self.cur)
        text = text.strip("\n") if self.pre else re.sub(r"\s+", " ", text).strip()
        if text:
            self.blocks.append(("#" * self.heading + " " if self.heading else "") + text)
        self.cur = []

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if self.skip:
            if tag in _DROP and tag not in _VOID:
                self.skip.append(tag)
            return
        role = dict(attrs).get("role") or ""
        if tag in _DROP or role in ("navigation", "banner", "contentinfo", "search"):
            if tag not in _VOID:
                self.skip.append(tag)
            return
        if re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading = int(tag[1])
        elif tag in _BLOCK:
            self._flush()
            if tag == "pre":
                self.pre += 1

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if self.skip:
            if tag == self.skip[-1]:
                self.skip.pop()
            elif tag in self.skip:   # tolerate unclosed children of a dropped element
                del self.skip[self.skip.index(tag):]
            return
        if re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self.heading = 0
        elif tag in _BLOCK:
            self._flush()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.in_title:
            self.title.append(data)
        if not self.skip:
            self.cur.append(data)


def _html(text: str) -> Extracted:
    p = _HtmlText()
    try:
        p.feed(text)
        p.close()
    except (AssertionError, ValueError):   # html.parser's own complaints on broken markup: keep what was read
        pass
    p._flush()
    title = re.sub(r"\s+", " ", "".join(p.title)).strip() or None
    body = "\n\n".join(p.blocks)
    if title and not any(b.startswith("# ") for b in p.blocks):
        body = f"# {title}\n\n{body}"     # the page title heads the document when it has no <h1>
    return Extracted(body, "markdown", title)


# ------------------------------------------------------------------------------------------------ PDF
def _pdf(data: bytes, path) -> Extracted:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PyPdfError
    except ImportError:
        raise DocumentError(path, "reading PDF needs the `pypdf` package: pip install 'llamaforge[rag]'") from None
    if not data.lstrip()[:5].startswith(b"%PDF"):
        raise DocumentError(path, "not a PDF file (no %PDF header)")
    logging.getLogger("pypdf").setLevel(logging.ERROR)   # malformed-but-readable files warn a lot
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")       # files with only an owner password open with an empty one
            except Exception:
                ok = 0
            if not ok:
                raise DocumentError(path, "the PDF is encrypted (password protected)")
        n = len(reader.pages)
        if n > MAX_PDF_PAGES:
            raise DocumentError(path, f"the PDF has {n} pages; at most {MAX_PDF_PAGES} are ingested")
        parts, size = [], 0
        for i, page in enumerate(reader.pages, 1):
            t = (page.extract_text() or "").strip()
            size += len(t)
            if size > MAX_TEXT_CHARS:
                raise DocumentError(path, f"more than {MAX_TEXT_CHARS:,} characters of text")
            if t:
                parts.append(f"# page {i}\n\n{t}")
        title = None
        try:
            meta = reader.metadata
            title = str(meta.title).strip() if meta and meta.title else None
        except Exception:
            title = None
    except DocumentError:
        raise
    except PyPdfError as e:
        raise DocumentError(path, f"malformed PDF: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OSError, AssertionError,
            ZeroDivisionError, UnicodeError) as e:   # pypdf lets these escape on broken files
        raise DocumentError(path, f"malformed PDF: {type(e).__name__}: {e}") from None
    if not parts:
        raise DocumentError(path, "the PDF has no extractable text (scanned images need OCR first)")
    return Extracted("\n\n".join(parts), "markdown", title)
