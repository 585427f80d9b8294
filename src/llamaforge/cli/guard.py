"""`llamaforge guard check|eval|code`: classify text with a guard, score a guard on a labelled set, scan code.

    llamaforge guard check "How do I kill a stuck process?" [--json]     -> {"safe", "categories", "score"}
    llamaforge guard check --file answer.txt --role agent
    llamaforge guard eval [--data FILE] [--split test]                  -> precision / recall / F1 / FPR
    llamaforge guard code app.py [--lang python] [--json]               -> {"verdict", "findings"}
    llamaforge guard code - < answer.md                                 (a model answer: its code blocks)

Exit status: 0 safe / pass, 1 an error, 2 bad usage, 3 unsafe / block (warn is 0), so scripts can gate on it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from .._fs import loads_json

MAX_TEXT_FILE = 8 << 20
MAX_CODE_FILE = 4 << 20
UNSAFE_EXIT = 3


def _guard_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="M", help="a Llama Guard 3/4 model (store name or path); default: the "
                                                "built-in guard")
    p.add_argument("--threshold", type=float, default=0.5, metavar="P",
                   help="probability of 'unsafe' at which a category is flagged (default 0.5)")
    p.add_argument("--category-threshold", action="append", default=[], metavar="CODE=P",
                   help="per-category threshold, e.g. S6=0.9 (repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="CODE", help="ignore a category (repeatable)")
    p.add_argument("--categories", metavar="FILE", help="custom taxonomy (JSON mapping code -> name, or a list "
                                                       "of names); Llama Guard models only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaforge guard", description="Safety checks: Llama Guard-style "
                                "classification of text, guard evaluation, Code Shield-style code scanning.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="classify a text as safe or unsafe (S1-S14 categories, score)")
    c.add_argument("text", nargs="?", metavar="TEXT", help="the text ('-' reads stdin)")
    c.add_argument("--file", metavar="F", help="read the text from a file")
    c.add_argument("--role", choices=("user", "agent"), default="user",
                   help="judge it as a user prompt (default) or as an assistant answer")
    c.add_argument("--json", action="store_true", help="print the verdict as JSON")
    _guard_flags(c)
    e = sub.add_parser("eval", help="precision / recall / F1 / FPR of a guard (or --code: the scanner)")
    e.add_argument("--data", metavar="FILE", help="labelled JSONL (default: the shipped held-out set)")
    e.add_argument("--split", metavar="NAME", help="only records whose 'split' is NAME (default for the shipped "
                                                   "sets: test)")
    e.add_argument("--code", action="store_true", help="evaluate the code scanner on labelled snippets")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    _guard_flags(e)
    k = sub.add_parser("code", help="scan source code (or a model answer's code blocks) for insecure patterns")
    k.add_argument("path", metavar="FILE", help="a source file, or '-' for stdin")
    k.add_argument("--lang", metavar="L", help="language (python, c, cpp, javascript, typescript, java, go, php, "
                                               "shell); default: from the file name or guessed")
    k.add_argument("--answer", action="store_true", help="treat the input as a model answer and scan its fenced "
                                                        "code blocks (the default for '-' and .md files)")
    k.add_argument("--no-semgrep", action="store_true", help="only the fast pattern pass")
    k.add_argument("--json", action="store_true", help="print {verdict, findings} as JSON")
    return p


def _load(args):
    from ..errors import InvalidRequestError
    from ..safety import load_guard
    thresholds = {}
    for item in args.category_threshold:
        code, _, value = item.partition("=")
        try:
            thresholds[code.strip()] = float(value)
        except ValueError:
            raise InvalidRequestError(f"--category-threshold needs CODE=P, got {item!r}",
                                      field="--category-threshold") from None
    cats = None
    if args.categories:
        from .._fs import read_text_bounded
        try:
            cats = loads_json(read_text_bounded(args.categories, 1 << 20, "categories file"))
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{args.categories}: not JSON ({e.msg})", field="--categories") from None
    return load_guard(args.model, categories=cats, excluded=args.exclude, threshold=args.threshold,
                      thresholds=thresholds)


def _read_text(args) -> str:
    from ..errors import InvalidRequestError
    if args.file and args.text:
        raise InvalidRequestError("give TEXT or --file, not both", field="--file")
    if args.file:
        return _decode(read_text_bounded_bytes(args.file, MAX_TEXT_FILE), args.file)
    if args.text == "-" or (args.text is None and not sys.stdin.isatty()):
        return _decode(read_text_bounded_bytes(sys.stdin.buffer, MAX_TEXT_FILE), "stdin")
    if args.text is None:
        raise InvalidRequestError("give the text to check, --file F, or pipe it on stdin", field="text")
    return args.text


def read_text_bounded_bytes(source, limit):
    from .._fs import read_bounded
    return read_bounded(source, limit, "input")


def _decode(data: bytes, where) -> str:
    from ..errors import InvalidRequestError
    if b"\x00" in data[:8192]:
        raise InvalidRequestError(f"{where} is a binary file, not text", field="--file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"{where} is not UTF-8 text (byte {e.start})", field="--file") from None


def _check(args) -> int:
    text = _read_text(args)
    v = _load(args).check(text, role=args.role)
    if args.json:
        print(json.dumps(v.to_dict()))
    else:
        from ..safety.categories import category_name
        cats = ", ".join(f"{c} {category_name(c)}" for c in v.categories)
        print(("safe" if v.safe else f"unsafe: {cats}") + f"  (score {v.score:.3f}, {v.model})")
    return 0 if v.safe else UNSAFE_EXIT


def _eval(args) -> int:
    from ..safety.evaluate import evaluate, evaluate_scanner, format_report, load_records
    data_dir = Path(__file__).resolve().parent.parent / "safety" / "data"
    if args.data:
        records = load_records(args.data, args.split)
    else:
        records = load_records(data_dir / ("code_snippets.jsonl" if args.code else "guard_prompts.jsonl"),
                               args.split or "test")
    rep = evaluate_scanner(records) if args.code else evaluate(_load(args), records)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0


def _code(args) -> int:
    from ..safety.code_scan import language_for_path, scan_answer, scan_code
    if args.path == "-":
        data = read_text_bounded_bytes(sys.stdin.buffer, MAX_CODE_FILE)
        name = "stdin"
    else:
        data = read_text_bounded_bytes(args.path, MAX_CODE_FILE)
        name = args.path
    text = _decode(data, name)
    answer = args.answer or (args.lang is None and (args.path == "-" or name.endswith((".md", ".markdown", ".txt"))))
    deep = False if args.no_semgrep else None
    if answer:
        res = scan_answer(text, deep=deep)
    else:
        res = scan_code(text, args.lang or language_for_path(name), deep=deep)
    if args.json:
        print(json.dumps(res.to_dict()))
    else:
        print(f"{res.verdict}" + (f" ({', '.join(res.languages)})" if res.languages else ""))
        for f in res.findings:
            print(f"  {name}:{f.line}: {f.severity} {f.cwe} [{f.rule}] {f.message}")
        for n in res.notes:
            print(f"  note: {n}")
    return UNSAFE_EXIT if res.verdict == "block" else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"check": _check, "eval": _eval, "code": _code}[args.action](args)
