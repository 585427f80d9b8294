"""The cache of compiled decode steps: which artifact a model needs, attaching it, building it in the background.

`model.aot` traces and compiles a step (AOTInductor) and runs it; this module decides where artifacts live and
when they are built. An artifact is keyed by everything the compiled code depends on (architecture, weight
layout, the model package's sources, torch build, CPU, thread count; `signature`) and cached under
`$LLAMAFORGE_HOME/compiled/`, least recently used ones pruned. A model without one decodes eagerly while a
low-priority process (`python -m llamaforge.cli.compile --build-step ...`) builds it; `current(lm)` picks it up
once it lands.

    lm = llamaforge.load(path)             # attaches lm.compiled when an artifact is cached, else builds one
    logits = decode_one(lm, token_id, cache, pos)   # compiled when possible, else the eager model
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..model import aot
from ..model.kv_cache import KVCache
from ..store import home, pid_alive

FORMAT_VERSION = 2            # bump when artifacts must be rebuilt for a reason outside model/*.py
_LOCK_STALE_S = 3600          # a build lock older than this (or whose process is gone) is ignored
KEEP_ARTIFACTS = 8            # compiled steps kept per store (least recently used ones go first)
_RETRY_FAILED_S = 86400       # a failed background build is not retried for a day
_POLL_S = 2.0                 # how often a process waiting for a background build looks for the artifact
BUILD_MODULE = "llamaforge.cli.compile"   # `python -m` entry point of the background build process


# --------------------------------------------------------------------------------------------- keys
def _source_digest() -> str:
    """The traced code itself: any edit to the model package invalidates artifacts built from older code."""
    h = hashlib.sha256()
    for f in sorted(Path(aot.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def signature(model: nn.Module, kv_dtype: torch.dtype) -> dict:
    """Everything the compiled code depends on. Two models with equal signatures share one artifact."""
    _, _, weights = aot.weight_slots(model)
    return {
        "format": FORMAT_VERSION,
        "source": _source_digest(),
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),  # inductor bakes the OpenMP thread count into its loops
        "config": {k: v for k, v in sorted(vars(model.config).items())
                   if isinstance(v, (int, float, str, bool)) and k != "name"},
        "rope": [round(float(x), 9) for x in model.inv_freq("cpu")[:4]],
        "quant": getattr(model, "_quant", None) or "none",
        "kv_dtype": str(kv_dtype),
        "weights": [(str(w.dtype), list(w.shape)) for w in weights],
        "modules": sorted({f"{type(m).__name__}:{getattr(m, 'out_dtype', None)}" for m in model.modules()}),
    }


def artifact_path(model: nn.Module, kv_dtype: torch.dtype) -> Path:
    """Where the compiled step of `model` (with a KV cache of `kv_dtype`) lives in this store."""
    digest = hashlib.sha256(json.dumps(signature(model, kv_dtype), sort_keys=True).encode()).hexdigest()[:24]
    return home() / "compiled" / f"decode-{digest}.pt2"


def build(model: nn.Module, path: Path) -> Path:
    """Compile the steps of `model` into `path` now (slow: ~2 min), then prune the cache around it."""
    path = Path(path)
    aot.build(model, path)
    _prune(path.parent, keep=path)
    return path


# --------------------------------------------------------------------------------------------- attaching
def attach(lm, *, build_missing: bool | str = "background") -> aot.CompiledDecoder | None:
    """Give a loaded model its compiled decode step (`lm.compiled`), or None.

    build_missing: "background" starts a low-priority build process when no artifact is cached (this process
    keeps decoding eagerly and `current(lm)` picks the artifact up once it lands), True builds now (blocking),
    False never builds. LLAMAFORGE_COMPILE=0 disables compiled decoding altogether.
    """
    lm.compiled, lm._compiled_pending = None, None
    if os.environ.get("LLAMAFORGE_COMPILE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    model = lm.model
    if next(model.parameters()).device.type != "cpu" or model.training:
        return None
    path = artifact_path(model, model.kv_dtype or torch.float32)
    if not path.exists():
        if build_missing is True:
            build(model, path)
        elif (build_missing == "background" and lm.path is not None and not (lm.defaults or {}).get("adapter")
              and not _failed_recently(path)):
            _start_background_build(lm, path)
            lm._compiled_pending = [path, time.monotonic() + _POLL_S]
            return None
        else:
            return None
    lm.compiled = _open(model, path)
    return lm.compiled


def current(lm) -> aot.CompiledDecoder | None:
    """`lm.compiled`, after checking (every few seconds, a stat call) whether a background build has landed."""
    pending = getattr(lm, "_compiled_pending", None)
    if pending and time.monotonic() >= pending[1]:
        pending[1] = time.monotonic() + _POLL_S
        if pending[0].exists():
            lm.compiled, lm._compiled_pending = _open(lm.model, pending[0]), None
    return getattr(lm, "compiled", None)


def decode_one(lm, token: int, cache: KVCache, pos: int, row: int = 0) -> torch.Tensor:
    """Logits [vocab] for one new token at `pos` in `row` of `cache`: compiled when possible, else eager."""
    step = current(lm)
    if step is not None and step.supports(cache):
        return step(token, cache, pos, row)
    ids = torch.tensor([[token]], dtype=torch.long, device=cache.k[0].device)
    rows = None if row == 0 else torch.tensor([row], device=ids.device)
    return lm.model(ids, cache=cache, input_pos=pos if rows is None else torch.tensor([pos]), rows=rows,
                    last_only=True)[0, -1]


def decode_batch(lm, tokens: list[int], cache: KVCache, positions: list[int], rows: list[int]):
    """Logits [B, vocab] for one new token in each of several cache rows through the compiled batched step, or
    None when it is not available (the caller then runs the eager batched forward)."""
    step = current(lm)
    if step is None or not step.supports(cache):
        return None
    return step.batch(tokens, cache, positions, rows)


def _open(model, path: Path) -> aot.CompiledDecoder | None:
    try:
        os.utime(path)  # "recently used", for _prune
        return aot.CompiledDecoder(model, path)
    except (RuntimeError, OSError):  # corrupt, foreign or unreadable: drop it, the eager path is always there
        path.unlink(missing_ok=True)
        return None


# --------------------------------------------------------------------------------------------- housekeeping
def _prune(folder: Path, keep: Path, max_files: int = KEEP_ARTIFACTS) -> None:
    """Drop the least recently used artifacts beyond `max_files` (each is a few MB; code updates orphan them)."""
    found = sorted((p for p in folder.glob("decode-*.pt2") if not p.stem.endswith("-batch")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in found if p != keep][max_files - 1:]:
        for f in (old, aot.batch_path(old), old.with_suffix(".log"), old.with_suffix(".lock"),
                  old.with_suffix(".failed")):
            f.unlink(missing_ok=True)


def failed_marker(path: Path) -> Path:
    """The file that remembers a failed build of the artifact at `path` (its text says why)."""
    return path.with_suffix(".failed")


def _failed_recently(path: Path) -> bool:
    """A build that failed in the last day is not retried in the background (`llamaforge compile` still can)."""
    try:
        return time.time() - failed_marker(path).stat().st_mtime < _RETRY_FAILED_S
    except FileNotFoundError:
        return False


def _start_background_build(lm, path: Path) -> None:
    lock = path.with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = lock.stat()
        pid = int(lock.read_text() or 0)
        if time.time() - st.st_mtime < _LOCK_STALE_S and pid > 0 and pid_alive(pid):
            return  # someone is building it already
        lock.unlink(missing_ok=True)
    except (FileNotFoundError, ValueError):
        pass
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    quant = lm.metadata.get("quant") or "none"
    cmd = [sys.executable, "-m", BUILD_MODULE, "--build-step", str(lm.path), "--quant", quant,
           "--threads", str(torch.get_num_threads()), "--out", str(path), "--lock", str(lock), "--idle"]
    log = open(path.with_suffix(".log"), "wb")
    # No preexec_fn (unsafe in threaded servers): the child lowers its own priority.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    os.write(fd, str(proc.pid).encode())
    os.close(fd)


# --------------------------------------------------------------------------------------------- listing
def _build_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
    except OSError:
        return []


def builds(root: Path | None = None) -> list[dict]:
    """Background builds of compiled steps in this store, read from their lock and marker files (for
    `llamaforge ps`): running ones ({"state": "building", "pid", "started", "model", "threads", "artifact"})
    and ones that failed within the last day ({"state": "failed", "reason", ...}), newest first."""
    folder = Path(root) if root is not None else home() / "compiled"
    out = []
    if not folder.is_dir():
        return out
    for lock in folder.glob("decode-*.lock"):
        try:
            st = lock.stat()
            pid = int(lock.read_text() or 0)
        except (OSError, ValueError):
            continue   # being written, or gone since the listing
        if pid <= 0 or not pid_alive(pid) or time.time() - st.st_mtime >= _LOCK_STALE_S:
            continue   # stale: the next build attempt removes it
        argv = _build_cmdline(pid)
        opt = {k: argv[i + 1] for i, k in enumerate(argv[:-1]) if k in ("--build-step", "--threads", "--quant")}
        out.append({"state": "building", "pid": pid, "started": st.st_mtime, "artifact": str(lock.with_suffix(".pt2")),
                    "model": opt.get("--build-step"), "threads": opt.get("--threads"), "quant": opt.get("--quant")})
    for marker in folder.glob("decode-*.failed"):
        try:
            st = marker.stat()
            reason = marker.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            continue
        if time.time() - st.st_mtime < _RETRY_FAILED_S:
            out.append({"state": "failed", "started": st.st_mtime, "artifact": str(marker.with_suffix(".pt2")),
                        "reason": (reason[0] if reason else "unknown")[:200], "pid": None, "model": None,
                        "threads": None, "quant": None})
    out.sort(key=lambda b: -b["started"])
    return out
