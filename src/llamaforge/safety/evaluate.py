"""Scoring a guard (or the code scanner) on a labelled set: precision, recall, F1 and false-positive rate,
overall and per category, plus the false-positive rate on each kind of benign prompt and the latency.

Prompt records (JSONL): {"text": str (or "messages": [...]), "label": "safe" | "unsafe" (or "unsafe": bool),
"categories": ["S2", ...] (optional), "role": "user" | "agent" (optional), "kind": str (optional)}.
Code records: {"code": str, "language": str, "label": "insecure" | "secure", "cwe": "CWE-78" (optional)}.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Iterable

from .._fs import read_text_bounded, loads_json
from ..errors import InvalidRequestError

MAX_DATA_BYTES = 64 << 20


def load_records(path, split: str | None = None) -> list[dict]:
    """Records of a JSONL file (bounded read); a bad line raises InvalidRequestError naming it."""
    text = read_text_bounded(path, MAX_DATA_BYTES, "data file")
    out = []
    for no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = loads_json(line)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{no}: not JSON ({e.msg})", field="data") from None
        if not isinstance(r, dict):
            raise InvalidRequestError(f"{path}:{no}: expected a JSON object", field="data")
        if split is None or r.get("split") == split:
            out.append(r)
    if not out:
        raise InvalidRequestError(f"{path}: no records" + (f" in split {split!r}" if split else ""), field="data")
    return out


def _gold(r: dict, no: int) -> tuple[bool, set[str]]:
    if "unsafe" in r and isinstance(r["unsafe"], bool):
        unsafe = r["unsafe"]
    elif r.get("label") in ("safe", "unsafe"):
        unsafe = r["label"] == "unsafe"
    else:
        raise InvalidRequestError(f"record {no}: needs 'label' ('safe' or 'unsafe')", field="data")
    cats = r.get("categories") or []
    if not isinstance(cats, list):
        raise InvalidRequestError(f"record {no}: 'categories' must be a list", field="data")
    return unsafe, set(cats)


def _prf(tp: int, fp: int, fn: int, tn: int) -> dict:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0,
            "fpr": round(fp / (fp + tn), 4) if fp + tn else 0.0, "support": tp + fn, "tp": tp, "fp": fp,
            "fn": fn, "tn": tn}


def evaluate(guard, records: Iterable[dict]) -> dict:
    """Run `guard.check` on every record; returns {"overall", "categories", "benign_fpr", "latency_ms", "n"}."""
    rows = []
    times = []
    for no, r in enumerate(records, start=1):
        unsafe, cats = _gold(r, no)
        content = r.get("messages") if r.get("messages") is not None else r.get("text")
        if not isinstance(content, (str, list)):
            raise InvalidRequestError(f"record {no}: needs 'text' or 'messages'", field="data")
        t0 = time.perf_counter()
        v = guard.check(content, role=r.get("role") or "user")
        times.append(time.perf_counter() - t0)
        rows.append((unsafe, cats, not v.safe, set(v.categories), r.get("kind") or ("unsafe" if unsafe else "benign")))
    c = lambda f: sum(1 for x in rows if f(x))  # noqa: E731
    overall = _prf(c(lambda x: x[0] and x[2]), c(lambda x: not x[0] and x[2]), c(lambda x: x[0] and not x[2]),
                   c(lambda x: not x[0] and not x[2]))
    codes = sorted({k for x in rows for k in x[1]} | {k for x in rows for k in x[3]}, key=lambda k: int(k[1:]))
    per = {}
    for k in codes:
        per[k] = _prf(c(lambda x: k in x[1] and k in x[3]), c(lambda x: k not in x[1] and k in x[3]),
                      c(lambda x: k in x[1] and k not in x[3]), c(lambda x: k not in x[1] and k not in x[3]))
    kinds = sorted({x[4] for x in rows if not x[0]})
    benign = {k: round(c(lambda x: x[4] == k and not x[0] and x[2]) / max(1, c(lambda x: x[4] == k and not x[0])), 4)
              for k in kinds}
    ms = [t * 1000 for t in times]
    return {"n": len(rows), "overall": overall, "categories": per, "benign_fpr": benign,
            "latency_ms": {"mean": round(statistics.fmean(ms), 1), "p50": round(statistics.median(ms), 1),
                           "max": round(max(ms), 1)}}


def evaluate_scanner(records: Iterable[dict], *, deep: bool | None = None) -> dict:
    """Run the code scanner on labelled snippets: flagged = verdict other than "pass"; also how often the
    expected CWE is among the findings of a caught insecure snippet."""
    from .code_scan import scan_code
    tp = fp = fn = tn = cwe_hit = 0
    per_lang: dict[str, list[int]] = {}
    ms = []
    kb = 0.0
    for no, r in enumerate(records, start=1):
        if r.get("label") not in ("insecure", "secure") or not isinstance(r.get("code"), str):
            raise InvalidRequestError(f"record {no}: needs 'code' and 'label' ('insecure' or 'secure')", field="data")
        t0 = time.perf_counter()
        res = scan_code(r["code"], r.get("language"), deep=deep)
        ms.append((time.perf_counter() - t0) * 1000)
        kb += len(r["code"].encode("utf-8")) / 1024
        flagged = res.verdict != "pass"
        bad = r["label"] == "insecure"
        lang = per_lang.setdefault(r.get("language") or "?", [0, 0, 0, 0])
        if bad and flagged:
            tp += 1
            lang[0] += 1
            cwe_hit += any(f.cwe == r.get("cwe") for f in res.findings)
        elif flagged:
            fp += 1
            lang[1] += 1
        elif bad:
            fn += 1
            lang[2] += 1
        else:
            tn += 1
            lang[3] += 1
    return {"n": tp + fp + fn + tn, "overall": _prf(tp, fp, fn, tn), "cwe_match": round(cwe_hit / max(1, tp), 4),
            "languages": {k: _prf(*v) for k, v in sorted(per_lang.items())},
            "ms_per_kb": round(sum(ms) / max(kb, 1e-9), 3)}


def format_report(rep: dict) -> str:
    """A plain-text table of an `evaluate` or `evaluate_scanner` report."""
    lines = [f"{'':12} {'precision':>9} {'recall':>7} {'F1':>6} {'FPR':>6} {'support':>8}"]

    def row(name, m):
        lines.append(f"{name:12} {m['precision']:9.3f} {m['recall']:7.3f} {m['f1']:6.3f} {m['fpr']:6.3f} "
                     f"{m['support']:8d}")

    row("overall", rep["overall"])
    for k, m in rep.get("categories", {}).items():
        row(k, m)
    for k, m in rep.get("languages", {}).items():
        row(k, m)
    if "benign_fpr" in rep:
        lines.append("false-positive rate by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in rep["benign_fpr"].items()))
    if "latency_ms" in rep:
        lat = rep["latency_ms"]
        lines.append(f"latency per check: mean {lat['mean']} ms, p50 {lat['p50']} ms, max {lat['max']} ms "
                     f"({rep['n']} records)")
    if "cwe_match" in rep:
        lines.append(f"expected CWE among the findings: {rep['cwe_match']:.3f}; {rep['ms_per_kb']} ms per KB "
                     f"({rep['n']} snippets)")
    return "\n".join(lines)
