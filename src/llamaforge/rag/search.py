"""Retrieval: vector search (sqlite-vec), keyword search (FTS5 BM25) and their fusion by reciprocal rank.

Hybrid (the default) takes the best `candidates` of each side and scores each chunk by reciprocal-rank fusion,
sum(1 / (60 + rank)) over the lists it appears in (Cormack, Clarke and Buettcher, SIGIR 2009; k=60 as there).
Exact keyword matches (names, numbers, error codes) rescue what a small embedding model misses, and the vectors
find paraphrases BM25 cannot. An optional cross-encoder re-ranks the fused candidates.

Results carry no duplicates: each chunk once, and a passage whose text is identical to a better-ranked one (the
same file ingested under two names) is dropped.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidRequestError
from .embedders import get_embedder, same_model
from .index import EmbedderMismatchError, Index

RRF_K = 60
MAX_K = 100
MODES = ("hybrid", "vector", "keyword")


@dataclass
class Hit:
    """One retrieved passage. score: fused RRF score (hybrid), cosine similarity (vector), BM25 (keyword) or the
    cross-encoder's score (re-ranked). start/end: character span in the document's extracted text."""

    source: str
    text: str
    score: float
    chunk_id: int
    start: int
    end: int
    heading: str = ""
    title: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def check_k(k, field: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidRequestError(f"k must be an integer between 1 and {MAX_K}, got {k!r}", field=field)
    return k


def embedder_for(index: Index, spec: str | None = None):
    """The embedder to query `index` with: the one it was built with; `spec` (if given) must be that model."""
    recorded = index.embedder
    if recorded is None:
        return get_embedder(spec) if spec else None
    emb = get_embedder(spec or recorded.get("spec"))
    if not same_model(emb.identity, recorded):
        raise EmbedderMismatchError(
            f"collection {index.name!r} was embedded with {_describe(recorded)}, not {_describe(emb.identity)}; "
            f"query it with its own model, or re-embed it: llamaforge rag reindex --collection {index.name} "
            f"--embedder {spec or emb.spec}")
    return emb


def _describe(identity: dict) -> str:
    return f"{identity.get('name')} ({identity.get('kind')}, {identity.get('dim')} dims, " \
           f"sha256 {str(identity.get('digest'))[:12]})"


def search(collection: str, query: str, k: int = 5, *, mode: str = "hybrid", embedder: str | None = None,
           reranker: str | None = None, candidates: int | None = None, root: Path | None = None) -> list[Hit]:
    """The `k` best passages of `collection` for `query` (see module docstring)."""
    with Index(collection, root=root) as index:
        return search_index(index, query, k, mode=mode, embedder=embedder, reranker=reranker,
                            candidates=candidates)


def search_index(index: Index, query: str, k: int = 5, *, mode: str = "hybrid", embedder: str | None = None,
                 reranker: str | None = None, candidates: int | None = None) -> list[Hit]:
    if not isinstance(query, str) or not query.strip():
        raise InvalidRequestError("the query is empty", field="query")
    check_k(k)
    if mode not in MODES:
        raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", field="mode")
    n = max(candidates or 0, 4 * k, 20)
    vec: list[tuple[int, float]] = []
    kw: list[tuple[int, float]] = []
    if mode in ("hybrid", "vector"):
        emb = embedder_for(index, embedder)
        if emb is not None:
            vec = index.vector_search(emb.embed([query])[0], n)
    if mode in ("hybrid", "keyword"):
        kw = index.keyword_search(query, n)
    if mode == "hybrid":
        ranked = rrf([vec, kw])
    else:
        ranked = vec or kw
    pool = ranked[: max(n, k)] if reranker else ranked
    rows = index.chunks_by_id([cid for cid, _ in pool])
    hits = [Hit(score=float(score), **_fields(rows[cid])) for cid, score in pool if cid in rows]
    hits = dedupe(hits)
    if reranker:
        from .rerank import get_reranker
        hits = get_reranker(reranker).rerank(query, hits)
    return hits[:k]


def rrf(lists: list[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of ranked (id, score) lists -> (id, fused score), best first (ties: lower id)."""
    fused: dict[int, float] = {}
    for lst in lists:
        for rank, (cid, _) in enumerate(lst, 1):
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def dedupe(hits: list[Hit]) -> list[Hit]:
    seen_ids, seen_text, out = set(), set(), []
    for h in hits:
        key = hashlib.sha1(" ".join(h.text.split()).lower().encode()).digest()
        if h.chunk_id in seen_ids or key in seen_text:
            continue
        seen_ids.add(h.chunk_id)
        seen_text.add(key)
        out.append(h)
    return out


def _fields(row: dict) -> dict:
    return {k: row[k] for k in ("source", "text", "chunk_id", "start", "end", "heading", "title")}
