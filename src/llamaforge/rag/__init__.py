"""Retrieval-augmented generation: collections of documents (SQLite + sqlite-vec + FTS5), hybrid search, the
seam stage that grounds chat answers in retrieved passages with [n] citations, and measurement.

    from llamaforge.rag.ingest import ingest          # ingest("notes", ["docs/"]) -> IngestReport
    from llamaforge.rag.search import search          # search("notes", "query", k=5) -> [Hit]
    llamaforge.load("smollm2").chat(messages, retrieval={"collection": "notes", "k": 5})   # .citations

See docs/rag.md. Submodules are imported on use (this package is imported by `llamaforge.api`).
"""
