"""The Code Shield-style scanner: the shipped labelled snippets, code-block extraction from model answers,
language handling, bad input, and the Semgrep pass (driven through a stand-in `semgrep` that prints Semgrep's
JSON output format, so the parsing is checked on every machine)."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from llamaforge.errors import InvalidRequestError
from llamaforge.safety.code_scan import (blank_comments, extract_code_blocks, guess_language, scan_answer,
                                         scan_code)
from llamaforge.safety.evaluate import evaluate_scanner, load_records

DATA = Path(__file__).resolve().parent.parent / "src" / "llamaforge" / "safety" / "data" / "code_snippets.jsonl"


def test_shipped_set_is_large_enough_and_paired():
    rows = load_records(DATA)
    assert len(rows) >= 60 and len({r["language"] for r in rows}) >= 6
    pairs = {}
    for r in rows:
        pairs.setdefault(r["pair"], set()).add(r["label"])
    assert all(v == {"insecure", "secure"} for v in pairs.values())


def test_dev_snippets_are_all_classified_right():
    for r in load_records(DATA, "dev"):
        res = scan_code(r["code"], r["language"], deep=False)
        if r["label"] == "insecure":
            assert res.verdict != "pass", r["id"]
            assert r["cwe"] in {f.cwe for f in res.findings}, r["id"]
        else:
            assert res.verdict == "pass", (r["id"], [f.to_dict() for f in res.findings])


def test_held_out_snippets_score():
    rep = evaluate_scanner(load_records(DATA, "test"), deep=False)
    assert rep["overall"]["recall"] >= 0.9 and rep["overall"]["fpr"] == 0.0 and rep["cwe_match"] == 1.0


def test_code_blocks_are_extracted_from_answers():
    answer = ("Try this:\n\n```py\nimport yaml\ncfg = yaml.load(open('c.yml'))\n```\n\nOr in C:\n~~~~\n"
              "#include <stdio.h>\nint main(){char b[4]; gets(b);}\n~~~~\nand ```inline``` code.\n"
              "```\nconsole.log('x')\n")
    blocks = extract_code_blocks(answer)
    assert [(b.language, b.tag, b.start_line, b.closed) for b in blocks] == [
        ("python", "py", 4, True), ("c", "", 10, True), ("javascript", "", 15, False)]
    res = scan_answer(answer, deep=False)
    assert res.verdict == "block"
    assert {(f.cwe, f.line) for f in res.findings} >= {("CWE-502", 5), ("CWE-242", 11)}


def test_comments_and_strings_do_not_trigger_rules():
    code = "# never use eval(x) here\nmsg = 'do not call os.system(cmd + x)'\nprint(msg)\n"
    assert scan_code(code, "python", deep=False).verdict == "pass"
    assert "eval" not in blank_comments(code, "python").split("\n")[0]
    c = "/* strcpy(a, b) is banned */\nint n = 1; // gets(buf)\n"
    assert scan_code(c, "c", deep=False).verdict == "pass"


def test_language_guessing_and_unknown_languages():
    assert guess_language("package main\nfunc main() {}\n") == "go"
    assert guess_language("<?php echo 1;") == "php"
    assert guess_language("#!/bin/bash\necho hi\n") == "shell"
    assert guess_language("def f(x):\n    return x\n") == "python"
    r = scan_code("IDENTIFICATION DIVISION.", "cobol")
    assert r.verdict == "pass" and "not supported" in r.notes[0]
    r = scan_code("just some words", None)
    assert r.verdict == "pass" and "could not tell" in r.notes[0]
    r = scan_answer("```rust\nfn main() { unsafe { } }\n```")
    assert r.verdict == "pass" and "not supported" in r.notes[0]


def test_bad_input_is_refused_by_name():
    with pytest.raises(InvalidRequestError, match="binary"):
        scan_code(b"\x7fELF\x00\x00\x01", "c")
    with pytest.raises(InvalidRequestError, match="UTF-8"):
        scan_code(b"\xff\xfe\xfa", "c")
    with pytest.raises(InvalidRequestError, match="larger"):
        scan_code("x = 1\n" * (1 << 20), "python")
    assert scan_code("", "python").verdict == "pass"


def test_semgrep_pass_merges_findings(tmp_path, monkeypatch):
    """A stand-in semgrep (same CLI and JSON output) checks how the deep pass is driven and parsed."""
    out = {"results": [{"check_id": "rules.python.flask-open-redirect", "start": {"line": 2},
                        "extra": {"severity": "ERROR", "message": "open redirect",
                                  "metadata": {"cwe": ["CWE-601: URL Redirection to Untrusted Site"]}}}],
           "errors": []}
    exe = tmp_path / "semgrep"
    log = tmp_path / "argv.json"
    exe.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                   f"json.dump(sys.argv[1:], open({str(log)!r}, 'w'))\nprint({json.dumps(json.dumps(out))})\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("LLAMAFORGE_SEMGREP", str(exe))
    res = scan_code("from flask import redirect, request\nreturn redirect(request.args['next'])\n", "python")
    assert res.engines == ["patterns", "semgrep"] and res.verdict == "block"
    assert [(f.cwe, f.line, f.rule) for f in res.findings] == [("CWE-601", 2, "flask-open-redirect")]
    argv = json.loads(log.read_text())
    assert "--metrics=off" in argv and argv[-1].endswith(".py")
    assert any(a.endswith("python.yaml") for a in argv)  # llamaforge's own rules
    monkeypatch.setenv("LLAMAFORGE_SEMGREP", str(tmp_path / "missing"))
    r = scan_code("x = 1\n", "python", deep=True)
    assert "semgrep is not installed" in r.notes[0] and r.engines == ["patterns"]
