"""The render worker's process: reads length-prefixed JSON requests (see `template_worker.py`), renders each with
the in-process sandbox, answers. A module of its own so the client side never imports the renderer it isolates."""
from __future__ import annotations

import json
import sys

from ..errors import TemplateError
from .jinja_sandbox import render_here
from .template_worker import _HEADER, WORKER_MEMORY_BYTES


def _serve() -> None:
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
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
