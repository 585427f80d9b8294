"""Counts of guard decisions in this process; `server.metrics` exports them as the Prometheus counter
`llamaforge_guard_decisions_total{check, result, category}`, and the Python API can read `snapshot()`."""
from __future__ import annotations

import threading

_lock = threading.Lock()
_counts: dict[tuple[str, str, str], int] = {}


def record(check: str, result: str, category: str = "") -> None:
    """One decision: check "input" | "output" | "code" | "injection"; result "safe" | "unsafe" | "block" |
    "warn" | "pass" | "marked" | "dropped"; category a hazard code, a CWE or a source ("" when none)."""
    key = (check, result, category)
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1


def snapshot() -> dict[tuple[str, str, str], int]:
    with _lock:
        return dict(_counts)
