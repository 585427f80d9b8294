"""`llamaforge compile [MODEL] [--quant Q] [--threads N] [--force]`: build the AOT-compiled decode step now.

`llamaforge.load` uses a cached artifact automatically and otherwise builds one in the background; this command
builds it up front (`make install` does it for the default model) so that the first chat decodes at full speed.

The background build process is this module too: `python -m llamaforge.cli.compile --build-step MODEL --out FILE
[--lock FILE] [--idle]` (started by `llamaforge.generate.compiled`; not meant to be typed).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import LlamaforgeError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="llamaforge compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2", help="store name or path (default: smollm2)")
    ap.add_argument("--quant", default=None, help="in-memory format to compile for (default: the model's default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads the step will run with (default: what run/serve use, one per usable core)")
    ap.add_argument("--force", action="store_true", help="rebuild even when a compiled step is cached")
    # The background build process (generate.compiled starts it): where to write, the lock it releases, priority.
    hidden = argparse.SUPPRESS
    ap.add_argument("--build-step", action="store_true", help=hidden)
    ap.add_argument("--out", default=None, help=hidden)
    ap.add_argument("--lock", default=None, help=hidden)
    ap.add_argument("--idle", action="store_true", help=hidden)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.threads is not None and a.threads < 1:
        ap.error("--threads must be >= 1")
    if a.build_step:
        return _build_step(a)
    import torch

    from ..api import load
    from ..generate import compiled
    from ..threads import apply_threads
    apply_threads(a.threads)
    t0 = time.perf_counter()
    lm = load(a.model, quant=a.quant, compile=False)
    if (lm.metadata.get("quant") or "none") == "none":
        print(f"{a.model}: dense float model; the compiled decode step is for quantized models (--quant q4, int8)",
              file=sys.stderr)
        return 1
    path = compiled.artifact_path(lm.model, lm.model.kv_dtype or torch.float32)
    if path.exists() and not a.force:
        print(f"compiled decode step for {a.model}: {path} (cached)")
        return 0
    with _Progress(f"compiling the decode step for {a.model} ({torch.get_num_threads()} threads, "
                   "about 1-2 min on 2 cores)"):
        compiled.build(lm.model, path)
    print(f"compiled decode step for {a.model}: {path} ({time.perf_counter() - t0:.0f} s, "
          f"{torch.get_num_threads()} threads)")
    return 0


class _Progress:
    """A progress line with the elapsed time, redrawn every second on a terminal; a start line otherwise."""

    def __init__(self, text: str):
        self.text, self.tty = text, sys.stderr.isatty()

    def __enter__(self):
        import threading
        self.t0, self.done = time.perf_counter(), threading.Event()
        if not self.tty:
            print(self.text + " ...", file=sys.stderr, flush=True)
            return self
        self.thread = threading.Thread(target=self._tick, daemon=True)
        self.thread.start()
        return self

    def _tick(self):
        while not self.done.wait(1.0 if time.perf_counter() - self.t0 > 0.1 else 0.0):
            sys.stderr.write(f"\r\033[K{self.text}: {time.perf_counter() - self.t0:.0f} s")
            sys.stderr.flush()

    def __exit__(self, *exc):
        self.done.set()
        if self.tty:
            self.thread.join()
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _build_step(a) -> int:
    """The background build: one line on stdout (the build log), a failure remembered next to the artifact so it
    is not retried at once, and the build lock released whatever happens."""
    out = Path(a.out) if a.out else None
    if a.idle:
        _idle_priority()
    import torch

    from ..api import load
    from ..generate import compiled
    try:
        if a.threads:
            torch.set_num_threads(a.threads)
        t0 = time.perf_counter()
        lm = load(a.model, quant=a.quant, compile=False)
        out = out or compiled.artifact_path(lm.model, lm.model.kv_dtype or torch.float32)
        if out.exists() and not a.force:
            print(f"compiled decode step: {out} (cached)")
            return 0
        compiled.build(lm.model, out)
        compiled.failed_marker(out).unlink(missing_ok=True)
        print(f"compiled decode step -> {out} ({time.perf_counter() - t0:.0f} s)")
        return 0
    except LlamaforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        if out is not None:
            compiled.failed_marker(out).write_text(f"{e}\n", encoding="utf-8")
        return 1
    finally:
        if a.lock:
            Path(a.lock).unlink(missing_ok=True)


def _idle_priority() -> None:
    """Background builds use only CPU nobody else wants: SCHED_IDLE where Linux offers it, else nice 19.
    A merely niced build still slows a foreground decode ~10x on 2 cores (its OpenMP threads get preempted
    at every barrier); an idle-class one waits for the gaps between requests."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
