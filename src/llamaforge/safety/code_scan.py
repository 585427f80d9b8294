"""Code Shield-style scanner: `scan_code(code, language)` -> verdict "block" | "warn" | "pass" with findings
{"cwe", "line", "rule", "severity", "message"}; `scan_answer(text)` scans every code block of a model answer.

Two passes. The fast pattern pass (`code_rules`) runs on every input: Python, C/C++, JavaScript/TypeScript, Java,
Go, PHP and shell, a few milliseconds per kilobyte. The deep pass runs Semgrep when the `semgrep` program is
installed: llamaforge's own rules (`data/semgrep/`) plus, when Meta's `codeshield` package is installed, its
Semgrep rules. Any "error" finding blocks; warnings alone annotate ("warn"); no finding passes. An unknown
language passes with a note saying nothing was checked (never an error), binary input is refused.

Why not Meta's `codeshield` package as the scanner: it is MIT and its Semgrep rules are good, but its regex pass
covers few constructs (three Python rules, one JavaScript rule), it has no Go or shell rules, and it makes
Semgrep (a ~100 MB native tool) a hard dependency. So the fast pass is ours and codeshield's rules are used by
the deep pass when the package is there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequestError
from .code_rules import LANGUAGES, prefilter, rules_for
from .._fs import loads_json

MAX_CODE_BYTES = 4 << 20          # 4 MiB per scan
SEMGREP_TIMEOUT_S = 60

ALIASES = {
    "py": "python", "python3": "python", "python2": "python", "py3": "python", "ipython": "python",
    "c": "c", "h": "c", "cpp": "cpp", "c++": "cpp", "cc": "cpp", "cxx": "cpp", "hpp": "cpp", "hh": "cpp",
    "js": "javascript", "javascript": "javascript", "node": "javascript", "jsx": "javascript", "mjs": "javascript",
    "cjs": "javascript", "ts": "typescript", "typescript": "typescript", "tsx": "typescript",
    "java": "java", "go": "go", "golang": "go", "php": "php",
    "sh": "shell", "bash": "shell", "zsh": "shell", "shell": "shell", "console": "shell", "shellscript": "shell",
    "ksh": "shell", "dash": "shell",
}
EXTENSIONS = {"python": "py", "c": "c", "cpp": "cpp", "javascript": "js", "typescript": "ts", "java": "java",
              "go": "go", "php": "php", "shell": "sh"}
_SUFFIX_LANG = {".py": "python", ".c": "c", ".h": "c", ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp", ".hpp": "cpp",
                ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
                ".ts": "typescript", ".tsx": "typescript", ".java": "java", ".go": "go", ".php": "php",
                ".sh": "shell", ".bash": "shell", ".zsh": "shell"}


@dataclass
class Finding:
    cwe: str
    line: int
    rule: str
    severity: str
    message: str
    language: str = ""
    engine: str = "patterns"

    def to_dict(self) -> dict:
        return {"cwe": self.cwe, "line": self.line, "rule": self.rule, "severity": self.severity,
                "message": self.message}


@dataclass
class ScanResult:
    """verdict: "block" (an error finding), "warn" (warnings only) or "pass"; notes say what was not checked."""

    verdict: str
    findings: list[Finding] = field(default_factory=list)
    languages: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "findings": [f.to_dict() for f in self.findings],
                "languages": self.languages, "notes": self.notes, "engines": self.engines}


def normalize_language(name: str | None) -> str | None:
    """A canonical language name (one of code_rules.LANGUAGES) for an alias or fence tag; None when unknown."""
    if not name:
        return None
    key = name.strip().lower().lstrip(".")
    key = re.split(r"[\s{,]", key)[0] if key else key
    return key if key in LANGUAGES else ALIASES.get(key)


def language_for_path(path) -> str | None:
    return _SUFFIX_LANG.get(Path(str(path)).suffix.lower())


_GUESSES = [
    ("php", re.compile(r"<\?php|\$_(GET|POST|REQUEST)\b")),
    ("shell", re.compile(r"^#!\s*/(usr/)?bin/(env\s+)?(ba|z|k|da)?sh\b", re.M)),
    ("python", re.compile(r"^#!.*python|^\s*(def \w+\(.*\)\s*(->.*)?:|import \w+|from [\w.]+ import |class \w+"
                          r"(\(.*\))?:|if __name__ == )", re.M)),
    ("go", re.compile(r"^package \w+|^func \w*\s*\(|:= |\bfmt\.\w+\(", re.M)),
    ("java", re.compile(r"\b(public|private|protected)\s+(static\s+)?(class|void|final|[A-Z]\w*(<.*>)?)\s+\w+|"
                        r"System\.out\.print|import java\.")),
    ("cpp", re.compile(r"#include\s*<(iostream|string|vector|memory|map)>|\bstd::|\bcout\s*<<|\bnamespace\s+\w+")),
    ("c", re.compile(r"#include\s*[<\"]|\bint\s+main\s*\(|\bprintf\s*\(|\bmalloc\s*\(")),
    ("typescript", re.compile(r"\binterface\s+\w+\s*\{|:\s*(string|number|boolean)\b|\bimport .* from ['\"]")),
    ("javascript", re.compile(r"\b(const|let|var)\s+\w+\s*=|\bfunction\s+\w*\s*\(|console\.log|require\(|=>\s*\{|"
                              r"document\.|module\.exports")),
    ("shell", re.compile(r"^\s*(sudo |apt(-get)? |echo |export \w+=|cd |ls |rm |curl |wget |chmod |mkdir )", re.M)),
]


def guess_language(code: str) -> str | None:
    """Best guess of a snippet's language from telltale constructs; None when nothing is telling."""
    for lang, pat in _GUESSES:
        if pat.search(code):
            return lang
    return None


_FENCE = re.compile(r"^(?P<indent>[ \t]{0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


@dataclass
class CodeBlock:
    code: str
    language: str | None      # canonical, or None when unknown
    tag: str                  # the fence's info string as written
    start_line: int           # 1-based line of the first code line in the answer
    closed: bool = True


def extract_code_blocks(text: str) -> list[CodeBlock]:
    """Fenced code blocks (``` or ~~~, CommonMark rules for the closing fence) of a markdown answer. A block left
    open at the end (a stream cut short) is returned with closed=False. The language comes from the info string,
    else it is guessed from the code."""
    blocks: list[CodeBlock] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        body: list[str] = []
        j = i + 1
        closed = False
        while j < len(lines):
            c = re.match(r"^[ \t]{0,3}(`{3,}|~{3,})[ \t]*$", lines[j])
            if c and c.group(1)[0] == fence[0] and len(c.group(1)) >= len(fence):
                closed = True
                break
            body.append(lines[j])
            j += 1
        code = "\n".join(body)
        tag = info.split()[0] if info else ""
        lang = normalize_language(tag) if tag else None
        if lang is None and not tag:
            lang = guess_language(code)
        blocks.append(CodeBlock(code, lang, tag, i + 2, closed))
        i = j + 1
    return blocks


# ------------------------------------------------------------------------------------------ comments
def blank_comments(code: str, language: str) -> str:
    """The code with comment text replaced by spaces (see `code_and_strings`)."""
    return code_and_strings(code, language)[0]


def code_and_strings(code: str, language: str) -> tuple[str, list[bool]]:
    """(code with comment text replaced by spaces, per-character "inside a string literal" flags). Line structure
    is kept. A '#' or '//' inside quotes is not a comment. Quotes other than backticks end at the line end (an
    apostrophe in odd code cannot swallow the rest of the file)."""
    out: list[str] = []
    mask: list[bool] = []
    i, n = 0, len(code)
    quote = None
    hash_comments = language in ("python", "shell", "php")
    slash_comments = language in ("c", "cpp", "javascript", "typescript", "java", "go", "php")
    while i < n:
        ch = code[i]
        if quote:
            if ch == "\\" and i + 1 < n and language != "shell":
                out.append(code[i:i + 2])
                mask += [True, True]
                i += 2
                continue
            out.append(ch)
            ended = ch == quote or (ch == "\n" and quote != "`")
            mask.append(not ended or ch == quote)
            if ended:
                quote = None
            i += 1
            continue
        if ch in "\"'`":
            quote = ch
            out.append(ch)
            mask.append(True)
            i += 1
            continue
        comment = False
        if hash_comments and ch == "#":
            # In shell a '#' starts a comment only at a word start ($#, ${#x}, a#b are not comments).
            comment = language != "shell" or i == 0 or code[i - 1] in " \t\n;&|("
        elif slash_comments and code.startswith("//", i):
            comment = True
        if comment:
            j = code.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            mask += [False] * (j - i)
            i = j
            continue
        if slash_comments and code.startswith("/*", i):
            j = code.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(c if c == "\n" else " " for c in code[i:j]))
            mask += [False] * (j - i)
            i = j
            continue
        out.append(ch)
        mask.append(False)
        i += 1
    return "".join(out), mask


# ------------------------------------------------------------------------------------------ passes
def _pattern_pass(code: str, language: str, line_offset: int = 0) -> list[Finding]:
    findings = []
    text, in_string = code_and_strings(code, language)
    rules = rules_for(language)
    gate = prefilter(language)
    start = 0
    for no, line in enumerate(text.split("\n"), start=1):
        offset, start = start, start + len(line) + 1
        if len(line) > 20000 or not gate.search(line):
            continue
        for r in rules:
            if r.unless is not None and r.unless.search(line):
                continue
            if any(r.in_strings or not in_string[offset + m.start()] for m in r.pattern.finditer(line)):
                findings.append(Finding(r.cwe, no + line_offset, r.id, r.severity, r.message, language))
    return findings


def semgrep_available() -> bool:
    return shutil.which(os.environ.get("LLAMAFORGE_SEMGREP", "semgrep")) is not None


def _semgrep_configs(language: str) -> list[str]:
    own = Path(__file__).resolve().parent / "data" / "semgrep"
    mine = own / f"{'javascript' if language == 'typescript' else language}.yaml"
    configs = [str(mine)] if mine.exists() else []
    try:
        import importlib.util
        spec = importlib.util.find_spec("codeshield")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        gen = Path(list(spec.submodule_search_locations)[0]) / "insecure_code_detector" / "rules" / "semgrep" / \
            "_generated_" / f"{ {'typescript': 'javascript', 'shell': ''}.get(language, language)}_codeshield.json"
        if gen.name != "_codeshield.json" and gen.exists():
            configs.append(str(gen))
    return configs


def _semgrep_pass(code: str, language: str, line_offset: int = 0) -> tuple[list[Finding], str | None]:
    configs = _semgrep_configs(language)
    if not configs:
        return [], None
    exe = shutil.which(os.environ.get("LLAMAFORGE_SEMGREP", "semgrep"))
    with tempfile.TemporaryDirectory(prefix="lf-scan-") as d:
        src = Path(d) / f"snippet.{EXTENSIONS[language]}"
        src.write_text(code, encoding="utf-8")
        cmd = [exe, "scan", "--json", "--quiet", "--metrics=off", "--disable-version-check", "--timeout", "20"]
        for c in configs:
            cmd += ["--config", c]
        cmd.append(str(src))
        env = dict(os.environ, SEMGREP_SEND_METRICS="off", SEMGREP_ENABLE_VERSION_CHECK="0")
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=SEMGREP_TIMEOUT_S, env=env, text=True)
        except (OSError, subprocess.TimeoutExpired) as e:
            return [], f"semgrep did not finish ({type(e).__name__}); only the pattern pass ran"
    try:
        data = loads_json(proc.stdout or "{}")
    except json.JSONDecodeError:
        return [], f"semgrep failed (exit {proc.returncode}); only the pattern pass ran"
    out = []
    for r in data.get("results", []):
        meta = (r.get("extra") or {}).get("metadata") or {}
        cwe = meta.get("cwe_id") or meta.get("cwe") or "CWE-000"
        if isinstance(cwe, list):
            cwe = cwe[0] if cwe else "CWE-000"
        m = re.search(r"CWE-\d+", str(cwe))
        sev = str((r.get("extra") or {}).get("severity", "WARNING")).lower()
        out.append(Finding(m.group(0) if m else "CWE-000", int(r.get("start", {}).get("line", 1)) + line_offset,
                           str(r.get("check_id", "semgrep")).split(".")[-1],
                           "error" if sev == "error" else "warning",
                           str((r.get("extra") or {}).get("message", "")).strip()[:300], language, "semgrep"))
    return out, None


def _verdict(findings: list[Finding]) -> str:
    if any(f.severity == "error" for f in findings):
        return "block"
    return "warn" if findings else "pass"


def _check_text(code) -> str:
    if isinstance(code, (bytes, bytearray)):
        if b"\x00" in code[:8192]:
            raise InvalidRequestError("the input is binary, not source code", field="code")
        try:
            code = bytes(code).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequestError(f"the input is not UTF-8 text (byte {e.start})", field="code") from None
    if not isinstance(code, str):
        raise InvalidRequestError("code must be text", field="code")
    if len(code.encode("utf-8", errors="replace")) > MAX_CODE_BYTES:
        raise InvalidRequestError(f"code is larger than {MAX_CODE_BYTES >> 20} MiB", field="code")
    if "\x00" in code:
        raise InvalidRequestError("the input is binary, not source code", field="code")
    return code


def scan_code(code, language: str | None = None, *, deep: bool | None = None) -> ScanResult:
    """Scan one source text. language: a name or alias (None: guessed). deep: run Semgrep (default: when
    installed). Unknown languages pass with a note; binary or oversized input raises InvalidRequestError."""
    t0 = time.perf_counter()
    code = _check_text(code)
    lang = normalize_language(language) if language else guess_language(code)
    if language and lang is None:
        return ScanResult("pass", notes=[f"language {language!r} is not supported by the scanner "
                                         f"(supported: {', '.join(LANGUAGES)}); nothing was checked"],
                          seconds=time.perf_counter() - t0)
    if lang is None:
        note = "empty input; nothing to check" if not code.strip() else \
            "could not tell the language; nothing was checked (pass --lang)"
        return ScanResult("pass", notes=[note], seconds=time.perf_counter() - t0)
    res = _scan_one(code, lang, 0, deep)
    res.seconds = time.perf_counter() - t0
    return res


def _scan_one(code: str, lang: str, line_offset: int, deep: bool | None) -> ScanResult:
    findings = _pattern_pass(code, lang, line_offset)
    engines, notes = ["patterns"], []
    if deep is None:
        deep = semgrep_available()
    if deep:
        if not semgrep_available():
            notes.append("semgrep is not installed; only the pattern pass ran")
        else:
            sg, note = _semgrep_pass(code, lang, line_offset)
            if note:
                notes.append(note)
            else:
                engines.append("semgrep")
            seen = {(f.line, f.cwe) for f in findings}
            findings += [f for f in sg if (f.line, f.cwe) not in seen]
    findings.sort(key=lambda f: (f.line, f.rule))
    return ScanResult(_verdict(findings), findings, [lang], notes, engines)


def scan_answer(text: str, *, deep: bool | None = None) -> ScanResult:
    """Scan every fenced code block of a model answer; findings carry lines of the answer text."""
    t0 = time.perf_counter()
    text = _check_text(text)
    findings: list[Finding] = []
    langs: list[str] = []
    notes: list[str] = []
    engines: list[str] = []
    for b in extract_code_blocks(text):
        if b.language is None:
            notes.append(f"code block at line {b.start_line - 1}" + (f" ({b.tag})" if b.tag else "") +
                         ": language not supported or not recognised; not checked")
            continue
        r = _scan_one(b.code, b.language, b.start_line - 1, deep)
        findings += r.findings
        notes += r.notes
        langs += [x for x in r.languages if x not in langs]
        engines += [x for x in r.engines if x not in engines]
    return ScanResult(_verdict(findings), findings, langs, notes, engines, time.perf_counter() - t0)
