"""Counters of guard decisions, forwarded to whoever collects them (the server's Prometheus registry).

Stages call `record(check, result, category)`; `server.metrics.Metrics` installs its counter with `set_sink`.
Without a sink the counts are kept here (`snapshot()`), so the Python API and tests can read them too.
"""
from __future__ import annotations

import threading
from typing import Callable

_lock = threading.Lock()
_counts: dict[tuple[str, str, str], int] = {}
_sinks: list[Callable[..., None]] = []


def set_sink(fn: Callable[..., None]) -> None:
    """fn(amount, check=..., result=..., category=...) is called for every recorded decision."""
    with _lock:
        if fn not in _sinks:
            _sinks.append(fn)


def record(check: str, result: str, category: str = "") -> None:
    """One decision: check "input" | "output" | "code" | "injection", result "safe" | "unsafe" | "block" |
    "warn" | "pass" | "marked" | "dropped", category a hazard code or CWE ("" when none)."""
    key = (check, result, category)
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1
        sinks = list(_sinks)
    for fn in sinks:
        fn(1.0, check=check, result=result, category=category)


def snapshot() -> dict[tuple[str, str, str], int]:
    with _lock:
        return dict(_counts)
