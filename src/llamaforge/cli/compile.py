"""`llamaforge compile [MODEL] [--quant Q] [--threads N] [--force]`: build the AOT-compiled decode step now.

`llamaforge.load` uses a cached artifact automatically and otherwise builds one in the background; this command
builds it up front (`make install` does it for the default model) so that the first chat decodes at full speed.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llamaforge compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", help="store name or path (default: smollm2)")
    ap.add_argument("--quant", default=None, help="in-memory format to compile for (default: the model's default)")
    ap.add_argument("--threads", type=int, default=None, help="threads the step will run with (default: torch's)")
    ap.add_argument("--force", action="store_true", help="rebuild even when a compiled step is cached")
    a = ap.parse_args(argv)
    import torch
    if a.threads:
        if a.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(a.threads)
    from ..api import load
    from ..model import aot
    t0 = time.perf_counter()
    lm = load(a.model, quant=a.quant, compile=False)
    if (lm.metadata.get("quant") or "none") == "none":
        print(f"{a.model}: dense float model; the compiled decode step is for quantized models (--quant q4, int8)",
              file=sys.stderr)
        return 1
    path = aot.artifact_path(lm.model, lm.model.kv_dtype or torch.float32)
    if path.exists() and not a.force:
        print(f"compiled decode step for {a.model}: {path} (cached)")
        return 0
    aot.build(lm.model, path)
    print(f"compiled decode step for {a.model}: {path} ({time.perf_counter() - t0:.0f} s, "
          f"{torch.get_num_threads()} threads)")
    return 0
