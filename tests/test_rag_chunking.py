"""Chunking and text extraction for RAG: heading paths against markdown-it-py's parse, exact character spans,
token bounds and overlap; HTML text only; PDF via pypdf; bad files as named DocumentErrors."""
from __future__ import annotations

import io

import pytest

from llamaforge.rag.chunking import blocks, chunk_text
from llamaforge.rag.extract import DocumentError, extract

words = lambda ws: [1] * len(ws)  # noqa: E731  one token per word: bounds are easy to check by hand

MD = """# Guide

Intro paragraph one.

Intro paragraph two.

## Install

Run the installer.

```sh
# not a heading
make install
```

### Linux

Use apt.

Setext Title
============

Under setext.

## Use
"""


def test_heading_paths_match_markdown_it():
    from markdown_it import MarkdownIt
    toks = MarkdownIt().parse(MD)
    ref = [toks[i + 1].content for i, t in enumerate(toks) if t.type == "heading_open"]
    assert ref == ["Guide", "Install", "Linux", "Setext Title", "Use"]
    got = [b.heading for b in blocks(MD, markdown=True)]
    assert "Guide > Install > Linux" in got
    assert "Setext Title" in got            # a level-1 setext heading resets the path
    assert not any("not a heading" in h for h in got)
    code = [b for b in blocks(MD, markdown=True) if "make install" in MD[b.start:b.end]]
    assert code and MD[code[0].start:code[0].end].startswith("```")   # the fence stays one block


def test_spans_are_exact_and_sections_never_mix():
    chunks = chunk_text(MD, markdown=True, token_counts=words, max_tokens=50)
    for c in chunks:
        assert MD[c.start:c.end] == c.text
    by_heading = {c.heading: c.text for c in chunks}
    assert by_heading["Guide"] == "Intro paragraph one.\n\nIntro paragraph two."   # small paragraphs packed
    assert by_heading["Guide > Install > Linux"] == "Use apt."
    assert "Use" not in by_heading   # a heading with no text makes no chunk
    assert chunk_text(MD, markdown=False, token_counts=words)[0].heading == ""


def test_long_paragraph_windows_are_bounded_and_overlap():
    text = " ".join(f"w{i}" for i in range(1000))
    chunks = chunk_text(text, markdown=False, token_counts=words, max_tokens=100, overlap=20)
    assert all(len(c.text.split()) <= 100 for c in chunks)
    covered = set()
    for a, b in zip(chunks, chunks[1:]):
        shared = set(a.text.split()) & set(b.text.split())
        assert len(shared) == 20
    for c in chunks:
        covered |= set(c.text.split())
        assert text[c.start:c.end] == c.text
    assert covered == set(text.split())


def test_token_counts_come_from_the_callback():
    text = "alpha beta gamma delta " * 30
    heavy = chunk_text(text, markdown=False, token_counts=lambda ws: [5] * len(ws), max_tokens=50, overlap=0)
    light = chunk_text(text, markdown=False, token_counts=words, max_tokens=50, overlap=0)
    assert all(len(c.text.split()) <= 10 for c in heavy) and len(heavy) == 12
    assert len(light) == 3


def test_html_keeps_text_and_headings_drops_scripts_styles_navigation():
    html = b"""<html><head><title>T</title><style>.x{color:red}</style><script>var secret=1;</script></head>
    <body><nav><a href="/">Home</a> Menu</nav><header>Site banner</header><h1>Main title</h1>
    <p>First <b>bold</b> para.</p><div role="navigation">Skip links</div><h2>Part</h2><p>Second para.</p>
    <footer>Copyright</footer><script>track()</script></body></html>"""
    doc = extract(html, "page.html")
    assert doc.kind == "markdown" and doc.title == "T"
    for gone in ("secret", "color", "Home", "Menu", "banner", "Skip links", "Copyright", "track"):
        assert gone not in doc.text
    assert "# Main title" in doc.text and "## Part" in doc.text and "First bold para." in doc.text
    heads = {c.heading for c in chunk_text(doc.text, markdown=True, token_counts=words)}
    assert "Main title > Part" in heads


def _pdf(text_by_page: list[str]) -> bytes:
    """A minimal valid PDF with one Helvetica text line per page, built by hand (offsets computed)."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for t in text_by_page:
        stream = f"BT /F1 12 Tf 72 720 Td ({t}) Tj ET".encode()
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
                    "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for i, o in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(f"{i} 0 obj\n{o}\nendobj\n".encode())
    xref = out.tell()
    out.write(f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode())
    for off in offsets:
        out.write(f"{off:010d} 00000 n \n".encode())
    out.write(f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def test_pdf_pages_become_sections():
    doc = extract(_pdf(["The ferry leaves at noon.", "The kettle holds two litres."]), "x.pdf")
    chunks = chunk_text(doc.text, markdown=True, token_counts=words)
    assert [(c.heading, c.text) for c in chunks] == [("page 1", "The ferry leaves at noon."),
                                                    ("page 2", "The kettle holds two litres.")]


def test_encrypted_pdf_is_refused():
    from pypdf import PdfReader, PdfWriter
    w = PdfWriter()
    w.append(PdfReader(io.BytesIO(_pdf(["secret"]))))
    w.encrypt(user_password="pw", owner_password="owner", algorithm="RC4-128")
    buf = io.BytesIO()
    w.write(buf)
    with pytest.raises(DocumentError, match="encrypted"):
        extract(buf.getvalue(), "locked.pdf")


@pytest.mark.parametrize("data,name,reason", [
    (b"%PDF-1.4\n1 0 obj << /Type /Catalog", "broken.pdf", "malformed PDF|no extractable text"),
    (b"GIF89a\x00\x01\x00\x00binary", "image.pdf", "not a PDF"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "picture.txt", "binary"),
    (b"caf\xe9 au lait", "latin1.txt", "not UTF-8"),
    (b"   \n\n  ", "blank.md", "no text"),
    (b"hello", "archive.zip", "unsupported file type"),
    (b"".join(bytes([i % 9]) for i in range(2000)), "ctrl.md", "binary"),
])
def test_bad_files_raise_named_errors(data, name, reason):
    with pytest.raises(DocumentError, match=reason) as e:
        extract(data, name)
    assert e.value.path == name


def test_text_encodings():
    assert extract("naïve\r\nline".encode("utf-8-sig"), "a.txt").text == "naïve\nline"
    assert extract("zwölf".encode("utf-16"), "b.txt").text == "zwölf"
