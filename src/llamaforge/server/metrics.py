"""A small Prometheus registry (text exposition format 0.0.4): counters, gauges, histograms with labels.

Written here rather than pulling in prometheus_client: we need a handful of series and a thread-safe render.
"""
from __future__ import annotations

import math
import threading
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict | None) -> tuple[str, ...]:
        labels = labels or {}
        return tuple(str(labels.get(n, "")) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge whose samples come from a callback at scrape time (so it can never drift from the truth)."""

    kind = "gauge"

    def __init__(self, name, help_, labels=(), collect: Callable[[], dict[tuple, float]] | None = None):
        super().__init__(name, help_, labels)
        self._collect = collect
        self._values: dict[tuple, float] = {}

    def set(self, value: float, **labels) -> None:
        with self._lock:
            self._values[self._key(labels)] = value

    def samples(self) -> dict[tuple, float]:
        if self._collect is not None:
            return dict(self._collect())
        with self._lock:
            return dict(self._values)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}"
                                for k, v in sorted(self.samples().items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_, labels=(), buckets=LATENCY_BUCKETS):
        super().__init__(name, help_, labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            d = self._data.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    d[i] += 1
            d[-2] += value
            d[-1] += 1

    def count(self, **labels) -> int:
        d = self._data.get(self._key(labels))
        return int(d[-1]) if d else 0

    def render(self) -> list[str]:
        out = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._data.items())
        for key, d in items:
            for i, b in enumerate(self.buckets):
                le = 'le="%s"' % _num(b)
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {d[i]}")
            inf = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.label_names, key, inf)} {d[-1]}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(d[-2])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {d[-1]}")
        return out


class Metrics:
    """Every series the server exports. Gauges for queue/active read the schedulers at scrape time."""

    def __init__(self, gauges_source: Callable[[], dict[str, dict[str, int]]] | None = None):
        self._source = gauges_source or (lambda: {})
        self.requests = Counter("llamaforge_requests_total", "HTTP requests by route and status code",
                                ("route", "status"))
        self.prompt_tokens = Counter("llamaforge_prompt_tokens_total", "Prompt tokens processed", ("model",))
        self.cached_tokens = Counter("llamaforge_prompt_cached_tokens_total",
                                     "Prompt tokens whose keys/values were reused from earlier requests", ("model",))
        self.prefix_hit_rate = Gauge("llamaforge_prefix_cache_hit_rate",
                                     "Reused / reusable prompt tokens since the model was loaded", ("model",),
                                     collect=lambda: self._gauge("prefix_cache_hit_rate"))
        self.prefix_bytes = Gauge("llamaforge_prefix_cache_bytes", "Memory held by the prompt-prefix cache",
                                  ("model",), collect=lambda: self._gauge("prefix_cache_bytes"))
        self.spec_drafted = Gauge("llamaforge_speculative_drafted_tokens",
                                  "Draft tokens verified by speculative decoding since the model was loaded",
                                  ("model",), collect=lambda: self._gauge("speculative_drafted_tokens"))
        self.spec_accepted = Gauge("llamaforge_speculative_accepted_tokens",
                                   "Draft tokens the model agreed with (each saves one decode step)", ("model",),
                                   collect=lambda: self._gauge("speculative_accepted_tokens"))
        self.spec_rate = Gauge("llamaforge_speculative_acceptance_rate", "Accepted / drafted tokens", ("model",),
                               collect=lambda: self._gauge("speculative_acceptance_rate"))
        self.generated_tokens = Counter("llamaforge_generated_tokens_total", "Tokens generated", ("model",))
        self.cancelled = Counter("llamaforge_cancelled_requests_total",
                                 "Generation requests cancelled (client disconnected)", ("model",))
        self.rejected = Counter("llamaforge_rejected_requests_total", "Requests refused because the queue was full",
                                ("model",))
        self.latency = Histogram("llamaforge_request_duration_seconds", "HTTP request latency", ("route",))
        self.ttft = Histogram("llamaforge_time_to_first_token_seconds", "Time from submission to first token",
                              ("model",))
        self.batch_size = Histogram("llamaforge_batch_size", "Active rows per decode step", ("model",),
                                    buckets=BATCH_BUCKETS)
        self.active = Gauge("llamaforge_active_requests", "Requests holding a batch slot", ("model",),
                            collect=lambda: self._gauge("active"))
        self.queued = Gauge("llamaforge_queued_requests", "Requests waiting for a batch slot (queue depth)",
                            ("model",), collect=lambda: self._gauge("queued"))
        self.loaded = Gauge("llamaforge_models_loaded", "Models loaded in memory", (),
                            collect=lambda: {(): float(len(self._source()))})

    def _gauge(self, key: str) -> dict[tuple, float]:
        return {(name,): float(g.get(key, 0)) for name, g in self._source().items()}

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.latency, self.prompt_tokens, self.cached_tokens, self.prefix_hit_rate,
                  self.prefix_bytes, self.spec_drafted, self.spec_accepted, self.spec_rate,
                  self.generated_tokens, self.cancelled,
                  self.rejected, self.ttft, self.batch_size, self.active, self.queued, self.loaded):
            lines += m.render()
        lines += _guard_counter().render()
        return "\n".join(lines) + "\n"


def _guard_counter() -> Counter:
    """Guard decisions of this process (safety.stats), per check, result and category (hazard code or CWE)."""
    from ..safety import stats
    c = Counter("llamaforge_guard_decisions_total", "Guard decisions by check (input, output, code, injection), "
                "result and category", ("check", "result", "category"))
    for (check, result, category), n in stats.snapshot().items():
        c.inc(n, check=check, result=result, category=category)
    return c
