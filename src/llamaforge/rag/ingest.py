"""Ingest files into a collection, keeping it in step with them by content hash.

- A file whose sha256 matches what the collection holds for its source is skipped (re-ingesting adds nothing).
- A changed file's chunks are replaced in one transaction.
- `sync=True` removes the documents of files that are gone from the directories (or file paths) named.
- A file that cannot be read (unreadable, binary, encrypted, malformed, too large, unsupported type) is reported as
  a `DocumentError` by name and the others are ingested; its earlier chunks, if any, are kept.

The source of a file is its absolute path; an upload's source is its file name.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .._fs import InputTooLargeError, read_bounded
from ..errors import InvalidRequestError, LlamaforgeError
from .chunking import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP, chunk_text
from .embedders import get_embedder
from .extract import DocumentError, extract, kind_for
from .index import Index, RagError
from .search import embedder_for

DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_FILES = 1_000_000


def max_file_bytes_default() -> int:
    """The per-file size limit: $LLAMAFORGE_RAG_MAX_FILE_BYTES, else 50 MiB."""
    env = os.environ.get("LLAMAFORGE_RAG_MAX_FILE_BYTES")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise InvalidRequestError(f"LLAMAFORGE_RAG_MAX_FILE_BYTES must be a number of bytes, got {env!r}",
                                      field="LLAMAFORGE_RAG_MAX_FILE_BYTES") from None
    return DEFAULT_MAX_FILE_BYTES


@dataclass
class IngestReport:
    """What an ingest did: sources per outcome, the per-file errors, chunks written and time taken."""

    collection: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[DocumentError] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"collection": self.collection, "added": self.added, "updated": self.updated,
                "unchanged": self.unchanged, "removed": self.removed, "chunks": self.chunks,
                "errors": [{"source": e.path, "error": e.reason} for e in self.errors],
                "seconds": round(self.seconds, 3)}


def collect_files(paths: Iterable[str | Path], errors: list[DocumentError]) -> list[Path]:
    """Files named, and supported files under directories named (hidden entries skipped), sorted, no repeats."""
    out: list[Path] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            out.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in sorted(filenames):
                    if not f.startswith(".") and kind_for(f) is not None:
                        add(Path(dirpath) / f)
                if len(out) > MAX_FILES:
                    raise RagError(f"more than {MAX_FILES:,} files under {p}")
        elif p.is_file():
            add(p)
        elif p.exists():
            errors.append(DocumentError(p, "not a regular file"))
        else:
            errors.append(DocumentError(p, "no such file or directory"))
    return out


class _Ingester:
    def __init__(self, index: Index, embedder: str | None, chunk_tokens: int | None, overlap: int | None):
        self.index = index
        self.emb = embedder_for(index, embedder) or get_embedder(embedder)
        settings = index.meta("chunking")
        wanted = {"max_tokens": int(chunk_tokens or (settings or {}).get("max_tokens") or DEFAULT_MAX_TOKENS),
                  "overlap": int(overlap if overlap is not None else (settings or {}).get("overlap",
                                                                                           DEFAULT_OVERLAP))}
        if not 8 <= wanted["max_tokens"] <= self.emb.max_tokens:
            raise InvalidRequestError(f"chunk size must be between 8 and {self.emb.max_tokens} tokens for this "
                                      f"embedding model, got {wanted['max_tokens']}", field="chunk_tokens")
        if not 0 <= wanted["overlap"] <= wanted["max_tokens"] // 2:
            raise InvalidRequestError("overlap must be between 0 and half the chunk size", field="overlap")
        if settings is not None and settings != wanted:
            raise InvalidRequestError(f"collection {index.name!r} is chunked with {settings['max_tokens']} tokens "
                                      f"and {settings['overlap']} overlap; leave the chunk options out, or ingest "
                                      "into a new collection", field="chunk_tokens")
        self.settings = wanted
        with index.write():
            if index.embedder is None:
                index.set_embedder(self.emb.identity)
            if index.meta("chunking") is None:
                index.set_meta("chunking", wanted)
            if index.meta("created") is None:
                index.set_meta("created", time.time())

    def one(self, source: str, data: bytes, kind: str | None, report: IngestReport) -> None:
        sha = hashlib.sha256(data).hexdigest()
        old = self.index.document(source)
        if old is not None and old["sha256"] == sha:
            report.unchanged.append(source)
            return
        doc = extract(data, source, kind)
        chunks = chunk_text(doc.text, markdown=doc.kind == "markdown", token_counts=self.emb.token_counts,
                            max_tokens=self.settings["max_tokens"], overlap=self.settings["overlap"])
        if not chunks:
            raise DocumentError(source, "no text found")
        vectors = self.emb.embed([c.embed_text() for c in chunks])
        status = self.index.replace_document(source, sha, kind or kind_for(source) or "text", doc.title, len(data),
                                             chunks, vectors)
        getattr(report, status).append(source)
        if status != "unchanged":
            report.chunks += len(chunks)


def ingest(collection: str, paths: Sequence[str | Path], *, embedder: str | None = None, sync: bool = False,
           max_file_bytes: int | None = None, chunk_tokens: int | None = None, overlap: int | None = None,
           progress: bool | Callable[[str], None] | None = None, root: Path | None = None) -> IngestReport:
    """Ingest files and directories into `collection` (created on first use). See the module docstring.

    embedder: the embedding model spec for a new collection (default all-MiniLM-L6-v2); for an existing one it
        must name the model the collection was built with. max_file_bytes: per-file limit (default 50 MiB or
        $LLAMAFORGE_RAG_MAX_FILE_BYTES). progress: True = a progress bar on stderr (default: when stderr is a
        terminal), or a callable given each source as it is done.
    """
    t0 = time.perf_counter()
    limit = max_file_bytes or max_file_bytes_default()
    report = IngestReport(collection)
    files = collect_files(paths, report.errors)
    with Index(collection, root=root, create=True) as index:
        report.collection = index.name
        ing = _Ingester(index, embedder, chunk_tokens, overlap)
        bar = _bar(len(files), progress)
        try:
            for p in files:
                source = str(p.resolve())
                try:
                    size = p.stat().st_size
                    if size > limit:
                        raise DocumentError(source, f"{size:,} bytes is over the size limit of {limit:,} bytes")
                    data = read_bounded(p, limit, "file")
                    ing.one(source, data, None, report)
                except DocumentError as e:
                    report.errors.append(e)
                except InputTooLargeError:
                    report.errors.append(DocumentError(source, f"over the size limit of {limit:,} bytes"))
                except (OSError, LlamaforgeError) as e:
                    if isinstance(e, (RagError, InvalidRequestError)):
                        raise
                    report.errors.append(DocumentError(source, str(e) if isinstance(e, LlamaforgeError)
                                                       else f"cannot read: {e.strerror or e}"))
                bar(source, report)
        finally:
            bar(None, report)
        if sync:
            report.removed = _sync(index, paths)
    report.seconds = time.perf_counter() - t0
    return report


def ingest_bytes(collection: str, filename: str, data: bytes, *, embedder: str | None = None,
                 max_file_bytes: int | None = None, root: Path | None = None) -> IngestReport:
    """Ingest one uploaded file (its source is its base name; its type comes from the name's suffix)."""
    name = upload_name(filename)
    limit = max_file_bytes or max_file_bytes_default()
    report = IngestReport(collection)
    if len(data) > limit:
        report.errors.append(DocumentError(name, f"{len(data):,} bytes is over the size limit of {limit:,} bytes"))
        return report
    t0 = time.perf_counter()
    with Index(collection, root=root, create=True) as index:
        report.collection = index.name
        ing = _Ingester(index, embedder, None, None)
        try:
            ing.one(name, data, None, report)
        except DocumentError as e:
            report.errors.append(e)
    report.seconds = time.perf_counter() - t0
    return report


def upload_name(filename) -> str:
    """The source name of an upload: the base name, no control characters, bounded length."""
    if not isinstance(filename, str) or not filename.strip():
        raise InvalidRequestError("an uploaded file needs a file name", field="file")
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name or name in (".", "..") or any(ord(c) < 32 for c in name) or len(name) > 255:
        raise InvalidRequestError(f"bad file name {filename[:80]!r}", field="file")
    return name


def _sync(index: Index, paths: Sequence[str | Path]) -> list[str]:
    roots = [str(Path(p).resolve()) for p in paths]
    removed = []
    for doc in index.documents():
        src = doc["source"]
        under = any(src == r or src.startswith(r.rstrip(os.sep) + os.sep) for r in roots)
        if under and not os.path.isfile(src):
            if index.remove_document(src):
                removed.append(src)
    return removed


def _bar(total: int, progress):
    """A progress callback: tqdm on stderr (when asked, or stderr is a terminal), or the caller's function."""
    if callable(progress):
        return lambda source, report: progress(source) if source is not None else None
    show = progress if progress is not None else sys.stderr.isatty()
    if not show or total == 0:
        return lambda source, report: None
    from tqdm import tqdm
    bar = tqdm(total=total, unit="file", desc="ingest", file=sys.stderr, leave=False)

    def update(source, report):
        if source is None:
            bar.close()
            return
        bar.update(1)
        bar.set_postfix(chunks=report.chunks, errors=len(report.errors), refresh=False)
    return update


def reindex(collection: str, *, embedder: str | None = None, progress: bool | None = None,
            root: Path | None = None) -> dict:
    """Re-embed every chunk of `collection` with `embedder` (default: all-MiniLM-L6-v2) and record it as the
    collection's model. Chunks are kept (their text is in the database), so the source files need not exist.
    The new vectors replace the old ones in one transaction: queries see the old index until it commits."""
    t0 = time.perf_counter()
    emb = get_embedder(embedder)
    with Index(collection, root=root) as index:
        total = index.count_chunks()
        ids: list[int] = []
        vecs = []
        bar = _bar(total, progress)
        report = IngestReport(index.name)
        for rows in index.iter_chunks():
            from .chunking import Chunk
            vecs.append(emb.embed([Chunk(t, h, 0, 0).embed_text() for _, h, t in rows]))
            ids += [r[0] for r in rows]
            for _ in rows:
                bar("", report)
        bar(None, report)
        import numpy as np
        with index.write():
            index.set_embedder(emb.identity)
            if ids:
                index.put_vectors(ids, np.concatenate(vecs))
    return {"collection": collection, "chunks": len(ids), "embedder": emb.identity,
            "seconds": round(time.perf_counter() - t0, 3)}
