"""Chat templates are rendered in worker processes that can be killed.

A template comes from a model file or a request: untrusted code. The sandbox (`jinja_sandbox.py`) blocks escapes
and bounds the constructs it knows, but Jinja filters and string methods loop in C or in jinja's own Python where
no budget reaches, so the work itself is bounded from outside: each render runs in a small worker process with a
memory limit (RLIMIT_AS) and a wall-clock deadline after which the parent kills it. A killed or crashed worker is
replaced on the next render; legitimate templates render in about a millisecond more than in-process.

Protocol: length-prefixed JSON over the worker's stdin/stdout, one request and one answer at a time per worker.
"""
from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time

from ..errors import TemplateError

RENDER_DEADLINE_S = 3.0          # wall-clock time a render may take before its worker is killed
STARTUP_DEADLINE_S = 60.0        # a new worker must say it is ready within this (a loaded machine is slow)
WORKER_MEMORY_BYTES = 1 << 30    # address-space limit of a worker process
MAX_WORKERS = 4                  # concurrent renders (server threads); more wait for a free worker
_HEADER = struct.Struct("<I")
_MAX_MESSAGE = 256 << 20


class _Worker:
    def __init__(self):
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "llamaforge.tokenizer.template_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, close_fds=True)
        try:  # the worker says it is ready once its imports are done: start-up is not render time
            if self._read(1, time.monotonic() + STARTUP_DEADLINE_S) != b"R":
                raise EOFError
        except (TimeoutError, EOFError):
            self.kill()
            raise OSError("the template worker did not start") from None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def call(self, request: dict, deadline: float) -> dict:
        data = json.dumps(request, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
        self.proc.stdin.write(_HEADER.pack(len(data)) + data)
        self.proc.stdin.flush()
        header = self._read(_HEADER.size, deadline)
        (n,) = _HEADER.unpack(header)
        if n > _MAX_MESSAGE:
            raise TemplateError("chat template output is too large")
        return json.loads(self._read(n, deadline).decode("utf-8", "surrogatepass"))

    def _read(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return bytes(out)


class _Pool:
    def __init__(self):
        self._idle: list[_Worker] = []
        self._count = 0
        self._cond = threading.Condition()

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                while self._idle:
                    w = self._idle.pop()
                    if w.alive():
                        return w
                    self._count -= 1
                if self._count < MAX_WORKERS:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            return _Worker()
        except OSError as e:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise TemplateError(f"cannot start the template worker: {e}") from None

    def _release(self, w: _Worker, ok: bool) -> None:
        with self._cond:
            if ok and w.alive():
                self._idle.append(w)
            else:
                self._count -= 1
            self._cond.notify()
        if not ok:
            w.kill()

    def render(self, request: dict) -> str:
        w = self._acquire()
        ok = False
        try:
            answer = w.call(request, time.monotonic() + RENDER_DEADLINE_S)
            ok = True
        except TimeoutError:
            raise TemplateError(f"chat template took longer than {RENDER_DEADLINE_S:g} s to render") from None
        except (EOFError, BrokenPipeError, OSError, ValueError):
            raise TemplateError("chat template exhausted the render worker's memory or crashed it") from None
        finally:
            self._release(w, ok)
        if "error" in answer:
            raise TemplateError(answer["error"])
        return answer["text"]


_POOL = _Pool()


def render_in_worker(source: str, max_output: int, extra_output: int, context: dict) -> str:
    """Render `source` with `context` in a worker (see module docstring); TemplateError on any failure."""
    return _POOL.render({"source": source, "max_output": max_output, "extra_output": extra_output,
                         "context": context})


# --------------------------------------------------------------------------------------------- the worker
def _serve() -> None:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    from .jinja_sandbox import render_here
    cache: dict[tuple[str, int], object] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b"R")
    stdout.flush()
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        (n,) = _HEADER.unpack(header)
        req = json.loads(stdin.read(n).decode("utf-8", "surrogatepass"))
        try:
            text = render_here(cache, req["source"], req["max_output"], req["extra_output"], req["context"])
            answer = {"text": text}
        except TemplateError as e:
            answer = {"error": str(e)}
        except MemoryError:
            answer = {"error": "chat template exhausted the render worker's memory"}
        data = json.dumps(answer, ensure_ascii=False).encode("utf-8", "surrogatepass")
        stdout.write(_HEADER.pack(len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    _serve()
