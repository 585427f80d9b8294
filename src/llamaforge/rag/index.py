"""One SQLite file per collection: documents, chunks, a BM25 index (FTS5) and a vector index (sqlite-vec).

    $LLAMAFORGE_HOME/rag/<name>.sqlite      (+ -wal / -shm while open)

Tables: `meta` (schema version, the embedding model's identity, chunking settings), `documents` (source, content
sha256, kind, title), `chunks` (document, heading path, character span, text), `chunks_fts` (FTS5 over text and
heading, rowid = chunk id) and `chunks_vec` (vec0, cosine distance, rowid = chunk id).

The database runs in WAL mode: readers never block the writer or each other, and SQLite admits one writer at a
time (`BEGIN IMMEDIATE` plus a busy timeout), so an ingest and any number of queries can run at once, from
threads or processes. A document's chunks are replaced in one transaction: a query sees the old version or the
new one, never half of each.

sqlite-vec is a loadable extension; Python builds whose `sqlite3` cannot load extensions (some pyenv and macOS
builds) use the `sqlean.py` package's sqlite3 instead, which can.
"""
from __future__ import annotations

import json
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import LlamaforgeError, StoreError
from .._fs import loads_json

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
MAX_NAME_LEN = 64


class RagError(LlamaforgeError):
    """A retrieval collection operation failed (missing dependency, broken database...)."""


class CollectionNotFoundError(RagError):
    """No collection of that name."""

    def __init__(self, name: str, known: Sequence[str] = ()):
        self.name = name
        msg = f"collection {name!r} not found"
        if known:
            msg += f" (collections: {', '.join(known)})"
        else:
            msg += "; create it with `llamaforge rag ingest --collection NAME PATH...`"
        super().__init__(msg)


class EmbedderMismatchError(RagError):
    """A query or ingest uses another embedding model than the one the collection was built with."""


def check_name(name) -> str:
    """A validated collection name: the model-name rules (no path tricks), flat (no '/', no ':')."""
    if not isinstance(name, str):
        raise StoreError(f"collection name must be a string, got {type(name).__name__}")
    from ..store import parse_name
    if ":" in name or "/" in name:
        shown = name.encode("unicode_escape").decode("ascii")[:80]
        raise StoreError(f"invalid collection name '{shown}': may not contain '/' or ':'")
    parse_name(name)   # NUL, backslash, absolute paths, '..', length, characters
    low = name.lower()
    if len(low) > MAX_NAME_LEN or not _NAME_RE.fullmatch(low):
        raise StoreError(f"invalid collection name {name!r}: letters, digits, '_', '-', '.' only, "
                         f"at most {MAX_NAME_LEN} characters")
    return low


def rag_home(root: Path | None = None) -> Path:
    from ..store import home
    return Path(root) if root is not None else home() / "rag"


def collection_path(name: str, root: Path | None = None) -> Path:
    return rag_home(root) / f"{check_name(name)}.sqlite"


def list_collections(root: Path | None = None) -> list[str]:
    d = rag_home(root)
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.sqlite") if _NAME_RE.fullmatch(p.stem))


def sqlite_module():
    """A sqlite3 module that can load extensions (the standard one when it can, else sqlean.py's)."""
    import sqlite3
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import sqlean
    except ImportError:
        raise RagError("this Python's sqlite3 cannot load extensions (needed for sqlite-vec); "
                       "pip install 'llamaforge[rag]' (adds sqlean.py)") from None
    return sqlean


def _connect(path: Path, *, create: bool):
    sqlite3 = sqlite_module()
    try:
        import sqlite_vec
    except ImportError:
        raise RagError("retrieval needs the `sqlite-vec` package: pip install 'llamaforge[rag]'") from None
    uri = f"file:{path}?mode={'rwc' if create else 'rw'}"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")   # WAL + NORMAL: durable at checkpoints, never corrupt
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as e:
        raise RagError(f"{path} is not a readable collection database: {e}") from None
    return conn


class Index:
    """An open collection database. Use as a context manager, or call `close()`."""

    def __init__(self, name: str, *, root: Path | None = None, create: bool = False):
        self.name = check_name(name)
        self.path = collection_path(self.name, root)
        if not self.path.exists():
            if not create:
                raise CollectionNotFoundError(self.name, list_collections(root))
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = _connect(self.path, create=create)
        self.sqlite = sqlite_module()
        try:
            self._ensure_schema()
        except self.sqlite.DatabaseError as e:
            self.close()
            raise RagError(f"collection {self.name!r} ({self.path}) is not a readable collection database: {e}") \
                from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        db, self.db = getattr(self, "db", None), None
        if db is not None:
            db.close()

    # ---------------------------------------------------------------------------------------- schema / meta
    def _ensure_schema(self) -> None:
        ready = self.db.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('meta', 'documents', 'chunks', "
                                "'chunks_fts')").fetchone()[0] == 4
        if ready:   # readers never take the write lock
            self._check_version(self.meta("schema_version"))
            return
        with self.write():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("""CREATE TABLE IF NOT EXISTS documents (
                id INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, kind TEXT NOT NULL,
                title TEXT, bytes INTEGER NOT NULL, chunks INTEGER NOT NULL, ingested_at REAL NOT NULL)""")
            self.db.execute("""CREATE TABLE IF NOT EXISTS chunks (
                id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
                ord INTEGER NOT NULL, heading TEXT NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL,
                text TEXT NOT NULL)""")
            self.db.execute("CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id)")
            self.db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, heading, "
                            "tokenize = 'porter unicode61 remove_diacritics 2')")
            version = self.meta("schema_version")
            if version is None:
                self.set_meta("schema_version", SCHEMA_VERSION)
            self._check_version(version or SCHEMA_VERSION)

    def _check_version(self, version) -> None:
        if version != SCHEMA_VERSION:
            raise RagError(f"collection {self.name!r} has schema version {version}; this llamaforge reads "
                           f"version {SCHEMA_VERSION}")

    def meta(self, key: str):
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return loads_json(row[0]) if row else None

    def set_meta(self, key: str, value) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = "
                        "excluded.value", (key, json.dumps(value)))

    @property
    def embedder(self) -> dict | None:
        """The identity of the embedding model the vectors were made with (None before the first ingest)."""
        return self.meta("embedder")

    def has_vectors(self) -> bool:
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'chunks_vec'").fetchone() is not None

    def set_embedder(self, identity: dict) -> None:
        """Record the embedding model and create the vector table for its dimension (inside a write)."""
        dim = int(identity["dim"])
        self.db.execute("DROP TABLE IF EXISTS chunks_vec")
        self.db.execute(f"CREATE VIRTUAL TABLE chunks_vec USING vec0(embedding float[{dim}] "
                        "distance_metric=cosine)")
        self.set_meta("embedder", identity)

    @contextmanager
    def write(self) -> Iterator[None]:
        """One write transaction (SQLite admits one writer at a time; others wait up to the busy timeout)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except self.sqlite.OperationalError as e:
            raise RagError(f"collection {self.name!r} is busy: {e}") from None
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---------------------------------------------------------------------------------------- documents
    def document(self, source: str) -> dict | None:
        row = self.db.execute("SELECT id, sha256, chunks FROM documents WHERE source = ?", (source,)).fetchone()
        return {"id": row[0], "sha256": row[1], "chunks": row[2]} if row else None

    def documents(self) -> list[dict]:
        rows = self.db.execute("SELECT source, sha256, kind, title, bytes, chunks, ingested_at FROM documents "
                               "ORDER BY source").fetchall()
        keys = ("source", "sha256", "kind", "title", "bytes", "chunks", "ingested_at")
        return [dict(zip(keys, r)) for r in rows]

    def replace_document(self, source: str, sha256: str, kind: str, title: str | None, size: int,
                         chunks: Sequence, vectors: np.ndarray) -> str:
        """Put a document's chunks in place of its old ones, in one transaction. Returns "added", "updated" or
        "unchanged" (another writer stored the same content meanwhile)."""
        with self.write():
            old = self.document(source)
            if old is not None and old["sha256"] == sha256:
                return "unchanged"
            if old is not None:
                self._delete_doc(old["id"])
            cur = self.db.execute("INSERT INTO documents(source, sha256, kind, title, bytes, chunks, ingested_at)"
                                  " VALUES (?, ?, ?, ?, ?, ?, ?)", (source, sha256, kind, title, size, len(chunks),
                                                                    time.time()))
            doc_id = cur.lastrowid
            vec = np.ascontiguousarray(vectors, dtype=np.float32)
            for i, c in enumerate(chunks):
                cid = self.db.execute('INSERT INTO chunks(doc_id, ord, heading, start, "end", text) VALUES '
                                      '(?, ?, ?, ?, ?, ?)', (doc_id, i, c.heading, c.start, c.end,
                                                             c.text)).lastrowid
                self.db.execute("INSERT INTO chunks_fts(rowid, text, heading) VALUES (?, ?, ?)",
                                (cid, c.text, c.heading))
                self.db.execute("INSERT INTO chunks_vec(rowid, embedding) VALUES (?, ?)", (cid, vec[i].tobytes()))
            return "updated" if old is not None else "added"

    def _delete_doc(self, doc_id: int) -> None:
        ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
        for cid in ids:
            self.db.execute("DELETE FROM chunks_fts WHERE rowid = ?", (cid,))
            self.db.execute("DELETE FROM chunks_vec WHERE rowid = ?", (cid,))
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        self.db.execute("DELETE FROM documents WHERE id = ?", (doc_id,))

    def remove_document(self, source: str) -> bool:
        with self.write():
            old = self.document(source)
            if old is None:
                return False
            self._delete_doc(old["id"])
            return True

    # ---------------------------------------------------------------------------------------- chunks
    def count_chunks(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def chunks_by_id(self, ids: Sequence[int]) -> dict[int, dict]:
        if not ids:
            return {}
        q = ",".join("?" * len(ids))
        rows = self.db.execute(f'SELECT c.id, d.source, c.text, c.heading, c.start, c."end", d.title FROM chunks c '
                               f'JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({q})', list(ids)).fetchall()
        return {r[0]: {"chunk_id": r[0], "source": r[1], "text": r[2], "heading": r[3], "start": r[4],
                       "end": r[5], "title": r[6]} for r in rows}

    def iter_chunks(self, batch: int = 256) -> Iterator[list[tuple[int, str, str]]]:
        """All (chunk id, heading, text) in id order, a batch at a time."""
        last = -1
        while True:
            rows = self.db.execute("SELECT id, heading, text FROM chunks WHERE id > ? ORDER BY id LIMIT ?",
                                   (last, batch)).fetchall()
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def put_vectors(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Store vectors for existing chunks (inside a write; used by reindex)."""
        vec = np.ascontiguousarray(vectors, dtype=np.float32)
        for cid, v in zip(ids, vec):
            self.db.execute("INSERT INTO chunks_vec(rowid, embedding) VALUES (?, ?)", (int(cid), v.tobytes()))

    # ---------------------------------------------------------------------------------------- search
    def vector_search(self, query: np.ndarray, n: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) of the `n` nearest chunks, best first."""
        if not self.has_vectors():
            return []
        q = np.ascontiguousarray(query, dtype=np.float32).tobytes()
        rows = self.db.execute("SELECT rowid, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ? "
                               "ORDER BY distance", (q, int(min(n, 4096)))).fetchall()
        return [(int(r[0]), 1.0 - float(r[1])) for r in rows]

    def keyword_search(self, query: str, n: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher is better) of the `n` best keyword matches."""
        expr = fts_query(query)
        if not expr:
            return []
        try:
            rows = self.db.execute("SELECT rowid, bm25(chunks_fts, 1.0, 0.5) AS s FROM chunks_fts WHERE chunks_fts "
                                   "MATCH ? ORDER BY s LIMIT ?", (expr, int(n))).fetchall()
        except self.sqlite.OperationalError:
            return []
        return [(int(r[0]), -float(r[1])) for r in rows]


# Words too common to help a keyword search (the BM25 side); the vector side still sees the whole query.
_STOP = frozenset("""a an and are as at be by can could did do does for from had has have how i in is it its of on
or that the their there these this to was were what when where which who whom why will with would you your""".split())


def fts_query(text: str) -> str:
    """An FTS5 expression matching any of the query's words (each quoted, so no FTS syntax gets through)."""
    words = [w for w in re.findall(r"\w+", text.lower()) if w not in _STOP]
    seen: list[str] = []
    for w in words:
        if w not in seen:
            seen.append(w)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in seen[:64])
