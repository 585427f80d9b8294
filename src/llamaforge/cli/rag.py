"""`llamaforge rag ...`: retrieval collections and grounded answers.

    llamaforge rag ingest --collection NAME PATH... [--sync] [--embedder SPEC] [--max-file-size 50M]
    llamaforge rag search --collection NAME QUERY [--k 5] [--mode hybrid|vector|keyword] [--reranker DIR] [--json]
    llamaforge rag ask [--model M] --collection NAME QUESTION [--k 5] [--json] [sampling flags as `generate`]
    llamaforge rag eval --collection NAME --questions FILE.jsonl [--k 5] [--model M] [--no-answers] [--json]
    llamaforge rag reindex --collection NAME [--embedder SPEC]
    llamaforge rag list [--json] | show NAME [--json] | rm NAME [--source SOURCE]
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from .flags import add_sampling_flags, check_sampling, sampling_from_args
from .._fs import read_stdin

DEFAULT_MODEL = "smollm2"
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000 ** 2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """"50M" / "10MiB" / "1000000" -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 20M, 512K, 1G)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise argparse.ArgumentTypeError("the size limit must be positive")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge rag", description="Retrieval-augmented answers: ingest documents "
                                "into a collection, search it, ask questions grounded in it, measure it.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def coll(sp):
        sp.add_argument("--collection", "-c", required=True, metavar="NAME", help="collection name")

    sp = sub.add_parser("ingest", help="add files and directories (txt, md, html, pdf) to a collection")
    coll(sp)
    sp.add_argument("paths", nargs="+", metavar="PATH")
    sp.add_argument("--sync", action="store_true", help="also remove documents of files that are gone")
    sp.add_argument("--embedder", metavar="SPEC", help="embedding model for a new collection: minilm (default), "
                    "a sentence-transformers directory, or a llamaforge model name/path")
    sp.add_argument("--max-file-size", type=parse_size, metavar="SIZE", help="skip larger files (default 50M, "
                    "or $LLAMAFORGE_RAG_MAX_FILE_BYTES)")
    sp.add_argument("--chunk-tokens", type=int, metavar="N", help="chunk size in embedding tokens (default 160)")
    sp.add_argument("--overlap", type=int, metavar="N", help="tokens shared by consecutive windows (default 32)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")

    sp = sub.add_parser("search", help="the passages that best match a query")
    coll(sp)
    sp.add_argument("query", metavar="QUERY")
    _search_flags(sp)
    sp.add_argument("--json", action="store_true", help='a JSON list of {"source","text","score","chunk_id",'
                                                        '"start","end"}')

    sp = sub.add_parser("ask", help="answer a question from a collection, citing passages")
    coll(sp)
    sp.add_argument("question", metavar="QUESTION", help="the question ('-' reads it from stdin)")
    sp.add_argument("--model", "-m", default=DEFAULT_MODEL, help="model to answer with (default smollm2)")
    sp.add_argument("--k", type=int, default=5, help="passages to ground the answer in (default 5)")
    sp.add_argument("--system", metavar="TEXT", help="a system prompt (the grounding rules are added to it)")
    add_sampling_flags(sp)
    sp.add_argument("--json", action="store_true", help='print {"answer", "citations", "grounding"}')

    sp = sub.add_parser("eval", help="recall@k, MRR and answer accuracy on a questions file")
    coll(sp)
    sp.add_argument("--questions", required=True, metavar="FILE", help="JSON Lines: question, answer, source")
    sp.add_argument("--k", type=int, default=5)
    sp.add_argument("--model", "-m", default=DEFAULT_MODEL, help="model for the answer check (default smollm2)")
    sp.add_argument("--no-answers", action="store_true", help="measure retrieval only")
    sp.add_argument("--reranker", metavar="DIR", help="also measure with this cross-encoder")
    sp.add_argument("--verbose", "-v", action="store_true", help="print each answer")
    add_sampling_flags(sp)
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("reindex", help="re-embed a collection with another (or the current) embedding model")
    coll(sp)
    sp.add_argument("--embedder", metavar="SPEC", help="minilm (default), a sentence-transformers directory, or "
                    "a llamaforge model")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("list", help="collections and their sizes")
    sp.add_argument("--json", action="store_true")
    sp = sub.add_parser("show", help="a collection's embedding model, settings and documents")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--json", action="store_true")
    sp = sub.add_parser("rm", help="delete a collection, or one document of it (--source)")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--source", metavar="SOURCE", help="remove only this document (its source as `show` lists)")
    return p


def _search_flags(sp) -> None:
    sp.add_argument("--k", type=int, default=5, help="how many passages (default 5)")
    sp.add_argument("--mode", choices=("hybrid", "vector", "keyword"), default="hybrid")
    sp.add_argument("--reranker", metavar="DIR", help="re-rank with this cross-encoder model directory")
    sp.add_argument("--embedder", metavar="SPEC", help="must be the collection's own model (else refused)")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return {"ingest": _ingest, "search": _search, "ask": _ask, "eval": _eval, "reindex": _reindex,
            "list": _list, "show": _show, "rm": _rm}[args.action](args)


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=None))


def _ingest(args) -> int:
    from ..rag.ingest import ingest
    rep = ingest(args.collection, args.paths, embedder=args.embedder, sync=args.sync,
                 max_file_bytes=args.max_file_size, chunk_tokens=args.chunk_tokens, overlap=args.overlap,
                 progress=False if args.no_progress else None)
    if args.json:
        _print_json(rep.as_dict())
    else:
        for e in rep.errors:
            print(f"error: {e}", file=sys.stderr)
        print(f"{rep.collection}: {len(rep.added)} added, {len(rep.updated)} updated, {len(rep.unchanged)} "
              f"unchanged, {len(rep.removed)} removed, {len(rep.errors)} failed; {rep.chunks} chunks written in "
              f"{rep.seconds:.1f}s")
    return 1 if rep.errors else 0


def _search(args) -> int:
    from ..rag.search import search
    hits = search(args.collection, args.query, args.k, mode=args.mode, embedder=args.embedder,
                  reranker=args.reranker)
    if args.json:
        _print_json([{k: h.as_dict()[k] for k in ("source", "text", "score", "chunk_id", "start", "end",
                                                  "heading")} for h in hits])
        return 0
    if not hits:
        print("no matching passages")
    for i, h in enumerate(hits, 1):
        where = f"{h.source} [{h.start}:{h.end}]" + (f" {h.heading}" if h.heading else "")
        print(f"{i}. {h.score:.4f}  {where}\n   {' '.join(h.text.split())[:300]}")
    return 0


def _ask(args) -> int:
    sampling = sampling_from_args(args)
    err = check_sampling(sampling)
    if err:
        print(err, file=sys.stderr)
        return 1
    question = read_stdin() if args.question == "-" else args.question
    from ..rag.index import Index
    from ..rag.search import check_k
    check_k(args.k, "--k")
    with Index(args.collection):   # a missing collection fails before the model loads
        pass
    import llamaforge
    lm = llamaforge.load(args.model)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": question}]
    retrieval = {"collection": args.collection, "k": args.k}
    if args.json:
        c = lm.chat(messages, retrieval=retrieval, **sampling)
        # grounding: "model" (the model's answer passed the answer check) or "extracted" (a source sentence)
        _print_json({"answer": c.text, "citations": [_citation(x) for x in c.citations],
                     "finish_reason": c.finish_reason, "grounding": (c.extra.get("grounding") or {}).get("answer")})
        return 0
    s = lm.chat(messages, stream=True, retrieval=retrieval, **sampling)
    for ev in s:
        sys.stdout.write(ev.text)
        sys.stdout.flush()
    print()
    c = s.completion
    cited = [x for x in c.citations if x.get("cited")] or c.citations
    if cited:
        print("\nSources:")
        for x in cited:
            print(f"[{x['n']}] {x['source']} [{x['start']}:{x['end']}]" + (f" {x['heading']}" if x.get("heading")
                                                                          else ""))
    return 0


def _citation(x: dict) -> dict:
    return {k: x.get(k) for k in ("n", "source", "text", "chunk_id", "heading", "start", "end", "cited")}


def _eval(args) -> int:
    sampling = sampling_from_args(args)
    err = check_sampling(sampling)
    if err:
        print(err, file=sys.stderr)
        return 1
    from ..rag.evaluate import evaluate_answers, evaluate_retrieval, load_questions
    from ..rag.index import Index
    from ..rag.search import check_k
    check_k(args.k, "--k")
    qs = load_questions(args.questions)
    out: dict = {"collection": args.collection, "questions": len(qs), "k": args.k, "retrieval": {}}
    with Index(args.collection) as ix:
        for mode in ("hybrid", "vector", "keyword"):
            r = evaluate_retrieval(ix, qs, args.k, mode)
            out["retrieval"][mode] = {"recall": r["recall"], "mrr": r["mrr"]}
        if args.reranker:
            r = evaluate_retrieval(ix, qs, args.k, "hybrid", reranker=args.reranker)
            out["retrieval"]["hybrid+rerank"] = {"recall": r["recall"], "mrr": r["mrr"]}
    if not args.json:
        print(f"{args.collection}: {len(qs)} questions, k={args.k}")
        for mode, r in out["retrieval"].items():
            print(f"  {mode:<14} recall@{args.k} {r['recall']:.3f}   MRR {r['mrr']:.3f}")
    if not args.no_answers:
        import llamaforge
        lm = llamaforge.load(args.model)

        def show(q, row):
            if args.verbose and not args.json:
                mark = ("F" if row["contains_fact"] else "-") + ("C" if row["cites_source"] else "-")
                print(f"  [{mark}] {q.question}\n        {' '.join(row['answer'].split())[:200]}")
        a = evaluate_answers(lm, args.collection, qs, args.k, sampling, on_answer=show)
        out["answers"] = {k: a[k] for k in ("answer_contains_fact", "cites_source", "correct")}
        out["answers"]["model"] = args.model
        if args.json:
            out["answers"]["rows"] = a["answers"]
        else:
            print(f"  answers ({args.model}): contain the fact {a['answer_contains_fact']:.3f}, cite the right "
                  f"source {a['cites_source']:.3f}, both {a['correct']:.3f}")
    if args.json:
        _print_json(out)
    return 0


def _reindex(args) -> int:
    from ..rag.ingest import reindex
    r = reindex(args.collection, embedder=args.embedder)
    if args.json:
        _print_json(r)
    else:
        print(f"{args.collection}: {r['chunks']} chunks re-embedded with {r['embedder']['name']} in "
              f"{r['seconds']:.1f}s")
    return 0


def _list(args) -> int:
    from ..rag.index import Index, list_collections
    rows = []
    for name in list_collections():
        with Index(name) as ix:
            emb = ix.embedder or {}
            rows.append({"name": name, "documents": len(ix.documents()), "chunks": ix.count_chunks(),
                         "embedder": emb.get("name"), "bytes": ix.path.stat().st_size})
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no collections (create one with `llamaforge rag ingest --collection NAME PATH...`)")
    for r in rows:
        print(f"{r['name']:<24} {r['documents']:>6} docs {r['chunks']:>8} chunks  {r['embedder'] or '-'}")
    return 0


def _show(args) -> int:
    from ..rag.index import Index
    with Index(args.name) as ix:
        info = {"name": ix.name, "path": str(ix.path), "embedder": ix.embedder, "chunking": ix.meta("chunking"),
                "chunks": ix.count_chunks(), "documents": ix.documents()}
    if args.json:
        _print_json(info)
        return 0
    emb = info["embedder"] or {}
    print(f"collection  {info['name']}\npath        {info['path']}\nembedder    {emb.get('name')} "
          f"({emb.get('kind')}, {emb.get('dim')} dims)\nchunking    {info['chunking']}\nchunks      "
          f"{info['chunks']}\ndocuments   {len(info['documents'])}")
    for d in info["documents"]:
        print(f"  {d['chunks']:>5} chunks  {d['source']}")
    return 0


def _rm(args) -> int:
    from ..rag.index import Index, collection_path, check_name
    name = check_name(args.name)
    with Index(name) as ix:
        if args.source:
            if not ix.remove_document(args.source):
                print(f"Error: collection {name!r} has no document {args.source!r}", file=sys.stderr)
                return 1
            print(f"removed {args.source} from {name}")
            return 0
    path = collection_path(name)
    for suffix in ("", "-wal", "-shm"):
        p = path.with_name(path.name + suffix)
        p.unlink(missing_ok=True)
    print(f"deleted collection {name}")
    return 0
