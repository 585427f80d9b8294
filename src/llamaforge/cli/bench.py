"""`llamaforge bench`: the side-by-side benchmark in bench/run.py (llamaforge vs llama.cpp vs transformers)."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

from ..errors import LlamaforgeError


def _bench_script() -> Path:
    # bench/ lives in the source checkout next to src/, not inside the installed package.
    script = Path(__file__).resolve().parents[3] / "bench" / "run.py"
    if not script.is_file():
        raise LlamaforgeError(f"benchmark script not found at {script}; `llamaforge bench` needs a source "
                              "checkout of llamaforge (git clone, then `make bench`)")
    return script


def main(argv: list[str]) -> int:
    """Run bench/run.py with `argv` (see `llamaforge bench --help`)."""
    script = _bench_script()
    sys.path.insert(0, str(script.parent))
    try:
        module = runpy.run_path(str(script), run_name="llamaforge_bench")
    finally:
        sys.path.remove(str(script.parent))
    return int(module["main"](argv, prog="llamaforge bench") or 0)
