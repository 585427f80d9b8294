"""RAG benchmark: ingest speed, query latency and retrieval quality at 10,000 chunks.

    .venv/bin/python bench/rag_bench.py                 # 10,000 chunks (default)
    .venv/bin/python bench/rag_bench.py --chunks 2000   # smaller, for a busy machine
    .venv/bin/python bench/rag_bench.py --peer          # + embedding speed vs sentence-transformers, same run

The corpus is the shipped demo set (42 questions with known answers) plus generated distractor documents written
from the same templates as the demo facts (other towns' ferries, kettles, libraries, festivals...), so that at
10,000 chunks the right passage has many look-alikes. Everything runs in a temporary $LLAMAFORGE_HOME.

Prints: ingest chunks/s (end to end: extract, chunk, embed, write) and the write-only rate; query latency p50/p95
for hybrid, vector-only and keyword-only search (in process, embedder loaded); recall@5 and MRR of each mode.
With --peer, all-MiniLM-L6-v2 embedding throughput of llamaforge's encoder and of sentence-transformers, each in
its own process, interleaved (A B A B), on the same texts.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOWNS = ["Arnhollow", "Bexmoor", "Caldry", "Dunwick", "Elsmere", "Farrowby", "Glenmarch", "Harwick", "Istbury",
         "Jorvale", "Kestwick", "Lindmoor", "Marrowgate", "Northam", "Oakridge", "Pellmouth", "Quarrow", "Rookdale",
         "Saltbury", "Thornby", "Umberlow", "Vantry", "Wexford", "Yarrowmere"]
FIRST = ["Anna", "Bruno", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Katya", "Lars",
         "Mira", "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tilda", "Ulf", "Vera", "Wim"]
LAST = ["Ashdown", "Brenner", "Castell", "Dorn", "Eckel", "Falk", "Gunn", "Holt", "Irwin", "Jansen", "Keller",
        "Lund", "Moss", "Norberg", "Orm", "Pike", "Quist", "Rask", "Stahl", "Thorn", "Uhl", "Voigt"]
BIRDS = ["Heron", "Gull", "Tern", "Cormorant", "Plover", "Curlew", "Petrel", "Osprey", "Kestrel", "Puffin"]
COLOURS = ["Grey", "Blue", "Red", "White", "Green", "Black", "Silver", "Amber"]
TEMPLATES = [
    ("Harbour ferry", "The ferry of {town} is called the {colour} {bird}. It carries up to {n3} passengers and the "
     "crossing takes {n2} minutes. A single adult ticket costs {n1} euros."),
    ("Founding", "{town} was founded in {year} by the merchant {name}. Today about {n5} people live there and the "
     "mayor is {name2}."),
    ("Kettle manual", "The {model} kettle holds {litres} litres. Descale it every {n2} days. Error code E{d} means "
     "the {part} has failed. The warranty lasts {d} years."),
    ("Library rules", "Members of the {town} library may borrow up to {n2} books for {n2b} days. The fine for a "
     "late book is {n2c} cents per day."),
    ("Festival", "The {town} {thing} festival is held every year in {month}. About {n4} {thing}s are carried "
     "through the streets and the traditional food is {food}."),
    ("Railway", "The {town} railway is {n2} kilometres long and opened in {year}. Its oldest locomotive is called "
     "{name}."),
    ("Glassworks", "The {town} glassworks opened in {year}. Its furnace runs at {n4} degrees and tours last {n2} "
     "minutes. The head glassblower is {name}."),
]
MONTHS = ["January", "March", "May", "June", "August", "September", "October", "December"]
THINGS = ["lantern", "torch", "boat", "flag", "drum", "ribbon"]
FOODS = ["smoked herring", "barley bread", "eel pie", "plum cake", "mussel soup", "salt cod"]
PARTS = ["heating element", "lid hinge", "power cable", "water gauge", "thermostat"]


def distractor_docs(n_chunks: int, seed: int = 0) -> list[tuple[str, str]]:
    """(file name, markdown) pairs; each section is one chunk."""
    rnd = random.Random(seed)
    docs, made, i = [], 0, 0
    while made < n_chunks:
        town = rnd.choice(TOWNS) + (f" {rnd.randint(2, 99)}" if rnd.random() < 0.7 else "")
        sections = []
        for title, tpl in rnd.sample(TEMPLATES, k=min(5, n_chunks - made)):
            sections.append(f"## {title}\n\n" + tpl.format(
                town=town, colour=rnd.choice(COLOURS), bird=rnd.choice(BIRDS), n1=rnd.randint(2, 9),
                n2=rnd.randint(10, 90), n2b=rnd.randint(10, 40), n2c=rnd.randint(5, 50), n3=rnd.randint(50, 400),
                n4=rnd.randint(500, 5000), n5=rnd.randint(1000, 90000), year=rnd.randint(1500, 1990),
                name=f"{rnd.choice(FIRST)} {rnd.choice(LAST)}", name2=f"{rnd.choice(FIRST)} {rnd.choice(LAST)}",
                model=f"{rnd.choice(['Vento', 'Kora', 'Brisk', 'Halo'])} {rnd.choice('ABCX')}{rnd.randint(1, 9)}",
                litres=f"{rnd.randint(10, 25) / 10:.1f}", d=rnd.randint(1, 9), part=rnd.choice(PARTS),
                month=rnd.choice(MONTHS), thing=rnd.choice(THINGS), food=rnd.choice(FOODS)))
        made += len(sections)
        docs.append((f"town_{i:05d}.md", f"# About {town}\n\n" + "\n\n".join(sections) + "\n"))
        i += 1
    return docs


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def bench_queries(index, questions, mode: str, rounds: int) -> list[float]:
    from llamaforge.rag.search import search_index
    times = []
    for _ in range(rounds):
        for q in questions:
            t = time.perf_counter()
            search_index(index, q.question, 5, mode=mode)
            times.append(time.perf_counter() - t)
    return times


def peer_embed(which: str, n: int) -> float:
    """Texts per second embedding n demo-like passages, in a fresh process."""
    code = f"""
import time, sys
texts = [f"The ferry of town {{i}} is called the Grey Heron and carries {{i % 400}} passengers across the estuary."
         for i in range({n})]
if {which!r} == "llamaforge":
    from llamaforge.rag.embedders import get_embedder
    e = get_embedder(); e.embed(texts[:8]); t = time.perf_counter(); e.embed(texts)
else:
    from sentence_transformers import SentenceTransformer
    from llamaforge.rag.embedders import default_model_dir
    m = SentenceTransformer(str(default_model_dir()), device="cpu"); m.encode(texts[:8])
    t = time.perf_counter(); m.encode(texts, batch_size=32, normalize_embeddings=True)
print(len(texts) / (time.perf_counter() - t))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=10_000, help="total chunks in the collection (default 10000)")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the 42 questions for latency")
    ap.add_argument("--peer", action="store_true", help="also compare embedding speed with sentence-transformers")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()

    home = tempfile.mkdtemp(prefix="lf-ragbench-")
    os.environ["LLAMAFORGE_HOME"] = home
    import llamaforge
    from llamaforge.rag.embedders import get_embedder
    from llamaforge.rag.evaluate import evaluate_retrieval, load_questions
    from llamaforge.rag.index import Index
    from llamaforge.rag.ingest import ingest

    data = Path(llamaforge.__file__).parent / "data" / "rag_demo"
    qs = load_questions(data / "questions.jsonl")
    corpus = Path(home) / "corpus"
    corpus.mkdir()
    t = time.perf_counter()
    get_embedder()
    load_s = time.perf_counter() - t
    demo = ingest("bench", [data / "docs"], progress=False)
    docs = distractor_docs(max(0, args.chunks - demo.chunks))
    for name, text in docs:
        (corpus / name).write_text(text)
    t = time.perf_counter()
    rep = ingest("bench", [corpus], progress=sys.stderr.isatty())
    ingest_s = time.perf_counter() - t
    assert not rep.errors, rep.errors[:3]
    with Index("bench") as ix:
        total = ix.count_chunks()
        # write-only rate: the same chunks again with their stored vectors, into a fresh collection
        rows = [r for batch in ix.iter_chunks() for r in batch]
        vecs = ix.db.execute("SELECT rowid, embedding FROM chunks_vec ORDER BY rowid").fetchall()
    import numpy as np

    from llamaforge.rag.chunking import Chunk
    vec_by_id = {r[0]: np.frombuffer(r[1], dtype=np.float32) for r in vecs}
    with Index("writeonly", create=True) as w:
        with w.write():
            w.set_embedder(get_embedder().identity)
        t = time.perf_counter()
        for s in range(0, len(rows), 50):
            part = rows[s:s + 50]
            w.replace_document(f"doc{s}", f"sha{s}", "markdown", None, 0, [Chunk(x[2], x[1], 0, len(x[2]))
                                                                           for x in part],
                               np.stack([vec_by_id[x[0]] for x in part]))
        write_s = time.perf_counter() - t

    out = {"chunks": total, "documents": len(docs) + len(demo.added), "embedder_load_s": round(load_s, 2),
           "ingest_chunks_per_s": round(rep.chunks / ingest_s, 1), "write_only_chunks_per_s":
           round(len(rows) / write_s, 1), "modes": {}}
    with Index("bench") as ix:
        for mode in ("hybrid", "vector", "keyword"):
            bench_queries(ix, qs[:5], mode, 1)   # warm caches
            lat = bench_queries(ix, qs, mode, args.rounds)
            r = evaluate_retrieval(ix, qs, 5, mode)
            out["modes"][mode] = {"p50_ms": round(1000 * statistics.median(lat), 1),
                                  "p95_ms": round(1000 * pct(lat, 95), 1), "recall@5": round(r["recall"], 3),
                                  "mrr": round(r["mrr"], 3)}
    if args.peer:
        ours, theirs = [], []
        for _ in range(2):
            ours.append(peer_embed("llamaforge", 512))
            theirs.append(peer_embed("sentence-transformers", 512))
        out["embed_texts_per_s"] = {"llamaforge": round(max(ours), 1), "sentence_transformers": round(max(theirs), 1)}

    print(f"\nRAG benchmark: {out['chunks']:,} chunks in {out['documents']:,} documents "
          f"(demo set + generated look-alikes), all-MiniLM-L6-v2, {os.cpu_count()} CPUs "
          f"(a shared machine: other work may run)")
    print(f"  embedder load              {out['embedder_load_s']:>8.2f} s")
    print(f"  ingest (extract+embed+write) {out['ingest_chunks_per_s']:>6.1f} chunks/s")
    print(f"  write only (vectors given)   {out['write_only_chunks_per_s']:>6.1f} chunks/s")
    print(f"\n  {'mode':<8} {'p50 ms':>8} {'p95 ms':>8} {'recall@5':>9} {'MRR':>6}")
    for mode, m in out["modes"].items():
        print(f"  {mode:<8} {m['p50_ms']:>8.1f} {m['p95_ms']:>8.1f} {m['recall@5']:>9.3f} {m['mrr']:>6.3f}")
    if "embed_texts_per_s" in out:
        e = out["embed_texts_per_s"]
        print(f"\n  embedding, texts/s (best of 2, interleaved, own processes): llamaforge {e['llamaforge']}, "
              f"sentence-transformers {e['sentence_transformers']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
