"""Ollama's /api/pull: add a model to the store with NDJSON progress, as `ollama pull` shows it.

What can be pulled over HTTP: a model already in the store (nothing to do, as Ollama), a Hugging Face repo id
(`owner/name`, `hf.co/owner/name`), or a local model file/directory inside a directory the operator allowed
(`serve --allow-pull-from DIR`). A name from Ollama's library gets a clear "not available offline" answer.

A path must never become a file-existence oracle: every path outside the allowed directories (lexically, before
the disk is touched, and again after symlinks are resolved), every relative path, and every path when nothing is
allowed gets one answer in the same words and status, whether or not the file exists.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request

from ..errors import LlamaforgeError, StoreError
from .common import ClientGone, StreamingEvents, dumps, json_response, read_json, until_disconnect
from .schemas import ApiError, OllamaPullRequest, bad_request

router = APIRouter()
log = logging.getLogger("llamaforge.server")
_REPORT_EVERY_S = 0.25   # progress lines at most this often (and at 100%)


class _Cancelled(StoreError):
    """The client went away: the copy stops and its partial blob is removed."""


def _refusal(source: str) -> ApiError:
    return ApiError(400, f"cannot pull {source!r}: it is not a model name, a Hugging Face repo id, or a model "
                         "in a directory this server allows pulling from (serve --allow-pull-from DIR)")


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def allowed_path(source: str, allowed: list[str]) -> Path:
    """The model path `source` names if it lies inside one of the `allowed` directories; else the one refusal.
    Only paths already inside an allowed directory (by their spelling) are ever looked at on disk."""
    if not allowed or "\x00" in source or not os.path.isabs(source):
        raise _refusal(source)
    lexical = os.path.normpath(source)
    roots = {os.path.normpath(os.path.abspath(d)) for d in allowed} | {os.path.realpath(d) for d in allowed}
    if not any(_inside(lexical, r) for r in roots):
        raise _refusal(source)
    real = os.path.realpath(lexical)   # a symlink inside an allowed directory may point anywhere
    if not any(_inside(real, os.path.realpath(d)) for d in allowed):
        raise _refusal(source)
    if not os.path.exists(real):
        raise ApiError(404, f"cannot pull {source!r}: no such file or directory in the allowed directories")
    return Path(real)


def plan_pull(store, source: str, allowed: list[str]) -> tuple[str, object]:
    """What a pull of `source` means: ("present", name), ("hf", repo id) or ("path", Path). Raises ApiError."""
    from ..store import parse_name
    from ..store.hub import hf_repo_id, ollama_library_message
    library = ollama_library_message(source)
    if library is not None:
        present = store.present(source)
        if present:
            return "present", present
        raise ApiError(404, library)
    try:
        parse_name(source)
        present = store.present(source)
        if present:
            return "present", present
    except StoreError:
        pass
    repo = hf_repo_id(source)
    if repo:
        return "hf", repo
    return "path", allowed_path(source, allowed)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    from ..store import model_dir_files
    return sum(p.stat().st_size for _, p in model_dir_files(path))


def run_pull(store, kind: str, target, report, cancelled) -> str:
    """Do the pull, calling `report(status dict)` as Ollama's progress lines; returns the store name."""
    report({"status": "pulling manifest"})
    if kind == "present":
        report({"status": "success"})
        return target
    done = {"n": 0, "at": 0.0}
    total = _size(target) if kind == "path" else None
    label = f"pulling {target.name}" if kind == "path" else f"pulling {target}"

    def progress(n: int) -> None:
        if cancelled():
            raise _Cancelled("the pull was cancelled")
        done["n"] += n
        now = time.monotonic()
        if now - done["at"] >= _REPORT_EVERY_S or (total is not None and done["n"] >= total):
            done["at"] = now
            line = {"status": label, "completed": done["n"]}
            if total is not None:
                line["total"] = total
            report(line)

    if kind == "path":
        report({"status": label, "total": total, "completed": 0})
        name = store.pull(target, progress=progress)
    else:
        report({"status": f"downloading {target} from Hugging Face"})
        name = store.pull_hf(target, progress=progress)
    report({"status": "verifying sha256 digest"})
    report({"status": "writing manifest"})
    report({"status": "success", "model": name})
    return name


@router.post("/api/pull")
async def pull(request: Request):
    st = request.app.state.server
    req = await read_json(request, OllamaPullRequest)
    source = (req.model or req.name or "").strip()
    if not source:
        raise bad_request("missing field 'model'", "model")
    from ..store import Store
    store = Store()
    kind, target = await asyncio.to_thread(plan_pull, store, source, list(st.config.allow_pull_from or []))
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = {"flag": False}

    def report(line: dict) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, line)

    def work():
        try:
            name = run_pull(store, kind, target, report, lambda: gone["flag"])
        except LlamaforgeError as e:
            report({"error": str(e)})
            return
        except Exception as e:   # a bug: keep the traceback in the log, one line for the client
            log.exception("pull of %r failed", source)
            report({"error": f"pull failed: {type(e).__name__}: {e}"})
            return
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)
        old = st.models.find(name)
        if old is not None and not old.pinned:
            st.models.unload(old.name)   # the next request loads what was just pulled

    task = asyncio.ensure_future(asyncio.to_thread(work))
    if req.stream:
        async def lines():
            while (line := await queue.get()) is not None:
                yield dumps(line) + b"\n"
            await task
        return StreamingEvents(lines(), "application/x-ndjson", lambda: gone.update(flag=True))
    async def drain():
        last = None
        while (line := await queue.get()) is not None:
            last = line
        await task
        return last

    try:   # a client that goes away stops the copy (its partial blob is removed)
        last = await until_disconnect(request, drain(), lambda: gone.update(flag=True))
    except ClientGone:
        return json_response({}, 499)
    if last is not None and "error" in last:
        raise ApiError(400, last["error"])
    return json_response({"status": "success"})
