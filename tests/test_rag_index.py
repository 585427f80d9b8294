"""RAG collections: content-hash ingest (re-ingest adds nothing, changed files replaced, --sync removes gone
files), per-file errors, size limits, name validation, the embedding-model check, vector search against a
brute-force numpy reference, no duplicate chunks, and ingest running while queries run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from rag_support import DEMO_DOCS, install_demo, tiny_bert_dir

from llamaforge.errors import StoreError
from llamaforge.rag.extract import extract
from llamaforge.rag.index import CollectionNotFoundError, EmbedderMismatchError, Index, check_name
from llamaforge.rag.ingest import ingest, reindex
from llamaforge.rag.search import rrf, search


def _docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    shutil.copytree(DEMO_DOCS, d)
    return d


def test_reingest_adds_nothing_changed_file_replaced_sync_removes(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.md").write_text("# Alpha\n\nThe alpha reactor runs on blue salt.\n")
    (d / "b.txt").write_text("The bridge toll is seven coins.\n")
    r1 = ingest("kb", [d], progress=False)
    assert sorted(Path(s).name for s in r1.added) == ["a.md", "b.txt"] and r1.chunks == 2
    with Index("kb") as ix:
        n1, docs1 = ix.count_chunks(), ix.documents()

    r2 = ingest("kb", [d], progress=False)
    assert r2.added == [] and r2.updated == [] and len(r2.unchanged) == 2 and r2.chunks == 0
    with Index("kb") as ix:
        assert ix.count_chunks() == n1 and ix.documents() == docs1

    (d / "a.md").write_text("# Alpha\n\nThe alpha reactor now runs on green sand.\n\n## Beta\n\nBeta text here.\n")
    r3 = ingest("kb", [d], progress=False)
    assert [Path(s).name for s in r3.updated] == ["a.md"] and len(r3.unchanged) == 1
    hits = search("kb", "what does the alpha reactor run on", 5)
    texts = " ".join(h.text for h in hits)
    assert "green sand" in texts and "blue salt" not in texts
    with Index("kb") as ix:
        assert ix.count_chunks() == 3

    (d / "b.txt").unlink()
    r4 = ingest("kb", [d], progress=False)
    assert r4.removed == []                      # without --sync nothing is removed
    r5 = ingest("kb", [d], sync=True, progress=False)
    assert [Path(s).name for s in r5.removed] == ["b.txt"]
    assert all("toll" not in h.text for h in search("kb", "bridge toll coins", 5))


def test_bad_files_are_named_and_the_rest_ingest(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "good.md").write_text("# Good\n\nThe lighthouse keeper is named Oona.\n")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (d / "latin.txt").write_bytes(b"caf\xe9")
    (d / "broken.pdf").write_bytes(b"%PDF-1.7\ngarbage")
    (d / "big.md").write_text("word " * 5000)
    (d / "skipped.bin").write_bytes(b"not even looked at")   # unsupported types in a directory are skipped
    rep = ingest("mixed", [d, tmp_path / "missing.md"], max_file_bytes=10_000, progress=False)
    assert [Path(s).name for s in rep.added] == ["good.md"]
    errs = {Path(e.path).name: e.reason for e in rep.errors}
    assert set(errs) == {"binary.txt", "latin.txt", "broken.pdf", "big.md", "missing.md"}
    assert "size limit" in errs["big.md"] and "binary" in errs["binary.txt"] and "UTF-8" in errs["latin.txt"]
    assert "no such file" in errs["missing.md"]
    assert search("mixed", "lighthouse keeper", 1)[0].text.endswith("Oona.")


def test_size_limit_from_environment(tmp_path, monkeypatch):
    (tmp_path / "x.txt").write_text("a" * 200)
    monkeypatch.setenv("LLAMAFORGE_RAG_MAX_FILE_BYTES", "100")
    rep = ingest("lim", [tmp_path / "x.txt"], progress=False)
    assert rep.added == [] and "size limit of 100 bytes" in rep.errors[0].reason


@pytest.mark.parametrize("bad", ["../evil", "a/b", "x:y", "nul\x00", "", "/abs", "back\\slash", ".hidden",
                                 "a" * 65, "sp ace"])
def test_collection_names_are_validated(bad, tmp_path):
    from llamaforge.rag.index import rag_home
    with pytest.raises(StoreError):
        check_name(bad)
    with pytest.raises(StoreError):
        ingest(bad, [DEMO_DOCS / "glassworks.txt"], progress=False)
    home = rag_home().parent
    assert not any(p.suffix == ".sqlite" for p in home.rglob("*"))
    assert not (home.parent / "evil.sqlite").exists()


def test_missing_collection_is_a_clear_error():
    with pytest.raises(CollectionNotFoundError, match="not found"):
        search("nothing-here", "query", 3)


def test_vector_search_matches_brute_force_cosine(tmp_path_factory):
    from llamaforge.rag.embedders import get_embedder
    install_demo(tmp_path_factory)
    emb = get_embedder()
    q = "Which plant glows after rain?"
    with Index("demo") as ix:
        ids, texts = [], []
        for rows in ix.iter_chunks():
            for cid, heading, text in rows:
                ids.append(cid)
                texts.append(f"{heading}\n\n{text}" if heading else text)
        got = ix.vector_search(emb.embed([q])[0], 8)
    vecs = emb.embed(texts)
    sims = vecs @ emb.embed([q])[0]
    order = np.argsort(-sims)[:8]
    assert [c for c, _ in got] == [ids[i] for i in order]
    np.testing.assert_allclose([s for _, s in got], sims[order], atol=1e-5)


def test_hybrid_is_reciprocal_rank_fusion():
    fused = rrf([[(1, 0.9), (2, 0.8), (3, 0.1)], [(3, 12.0), (1, 5.0)]])
    expect = {1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61}
    assert [c for c, _ in fused] == sorted(expect, key=lambda c: -expect[c])
    assert all(abs(s - expect[c]) < 1e-12 for c, s in fused)


def test_search_results_have_no_duplicates(tmp_path):
    d = _docs(tmp_path)
    shutil.copyfile(d / "harbour_ferry.md", d / "ferry_copy.md")
    ingest("dup", [d], progress=False)
    for mode in ("hybrid", "vector", "keyword"):
        hits = search("dup", "What is the name of the harbour ferry?", 10, mode=mode)
        assert len({h.chunk_id for h in hits}) == len(hits)
        assert len({" ".join(h.text.split()) for h in hits}) == len(hits)
        for h in hits:
            assert set(h.as_dict()) >= {"source", "text", "score", "chunk_id", "start", "end"}
            doc = extract(Path(h.source).read_bytes(), h.source)   # spans index the extracted text
            assert doc.text[h.start:h.end] == h.text


def test_embedder_mismatch_is_refused_until_reindexed(tmp_path, tmp_path_factory):
    install_demo(tmp_path_factory)
    other = tiny_bert_dir(tmp_path / "tiny-bert")
    with pytest.raises(EmbedderMismatchError, match="reindex"):
        search("demo", "ferry", 3, embedder=str(other))
    with pytest.raises(EmbedderMismatchError, match="reindex"):
        ingest("demo", [DEMO_DOCS], embedder=str(other), progress=False)
    r = reindex("demo", embedder=str(other))
    assert r["chunks"] > 0 and r["embedder"]["dim"] == 32
    assert search("demo", "ferry", 3, embedder=str(other))      # the new model is now the collection's
    with pytest.raises(EmbedderMismatchError, match="reindex"):
        search("demo", "ferry", 3, embedder="minilm")
    assert search("demo", "ferry", 3)                              # default: the collection's own model


def test_ingest_while_querying_threads_and_a_process(tmp_path, tmp_path_factory):
    install_demo(tmp_path_factory)
    d = tmp_path / "more"
    d.mkdir()
    for i in range(6):
        (d / f"note{i}.md").write_text(f"# Note {i}\n\nThe code word for note {i} is zebra{i}.\n")
    errors, results = [], []
    stop = threading.Event()
    with Index("demo") as ix:
        n0 = ix.count_chunks()
    baseline = search("demo", "What is the name of the harbour ferry?", 3)[0].text

    def reader():
        while not stop.is_set():
            try:
                hits = search("demo", "What is the name of the harbour ferry?", 3)
                results.append(hits[0].text)
                with Index("demo") as ix:
                    assert ix.count_chunks() >= n0
            except Exception as e:  # any error here is a failure of concurrent safety
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from llamaforge.rag.ingest import ingest; "
                             "r = ingest('demo', [sys.argv[1]], progress=False); "
                             "sys.exit(1 if r.errors else 0)", str(d)], env=env)
    try:
        rep = ingest("demo", [d], progress=False)
        assert proc.wait(timeout=600) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    assert results and set(results) == {baseline}     # every query saw a whole, consistent index
    assert not rep.errors
    with Index("demo") as ix:
        notes = [d_ for d_ in ix.documents() if Path(d_["source"]).name.startswith("note")]
        assert len(notes) == 6 and all(n["chunks"] == 1 for n in notes)   # each note once, despite two writers
        assert ix.count_chunks() == n0 + 6


def test_a_corrupt_collection_file_is_a_clear_error():
    from llamaforge.rag.index import RagError, collection_path
    p = collection_path("broken")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RagError, match="not a readable collection"):
        search("broken", "anything", 3)
