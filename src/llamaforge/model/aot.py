"""The single-token decode step, compiled ahead of time with AOTInductor (CPU fast path).

Why: in eager PyTorch a decode step of a small model is mostly dispatch: ~600 small ops at 1-3 us each cost
~4-5 ms per token, as much as the weight kernels themselves (bench/NOTES.md). Inductor fuses the small ops into a
few C++ loops. Doing that with `torch.compile` at run time would import dynamo and inductor (+150 MB resident)
and compile for 10-60 s in every process, so instead the step is exported once per (architecture, weight layout,
torch build, CPU, thread count), compiled into a shared library in a separate process, and cached on disk under
`$LLAMAFORGE_HOME/compiled/`. Loading it later takes milliseconds and only PyTorch's C++ runner.

What is traced is the model's own code (`Llama.forward` with one new token at one position for one row, cache
written as a slice): there is no second implementation of the architecture. Weights are inputs of the compiled
step, not baked into it, so the artifact is shared by every model file of the same shape and adds no memory.

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

from ..errors import CompileError, LlamaforgeError
from .kv_cache import KVCache

FORMAT_VERSION = 2            # bump when artifacts must be rebuilt for a reason outside model/*.py
_LOCK_STALE_S = 3600          # a build lock older than this (or whose process is gone) is ignored
KEEP_ARTIFACTS = 8            # compiled steps kept per store (least recently used ones go first)
_RETRY_FAILED_S = 86400       # a failed background build is not retried for a day
_POLL_S = 2.0                 # how often a process waiting for a background build looks for the artifact


# --------------------------------------------------------------------------------------------- tracing
class _DecodeStep(nn.Module):
    """forward(token [1, 1], span [S], k_0, v_0, ..., k_L, v_L, *weights) -> logits [1, vocab] float32.

    S - 1 is the new token's position. It travels as the length of a placeholder tensor because the compiled
    runner takes tensors only. The caches are the full [1, n_kv, max_len, D] tensors, written in place.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.names, self.index, self.weights = _weight_slots(model)

    def forward(self, token, span, *tensors):
        n_layers = self.model.config.num_hidden_layers
        kv, weights = tensors[:2 * n_layers], tensors[2 * n_layers:]
        pos = span.shape[0] - 1
        torch._check(pos >= 1)
        torch._check(pos < kv[0].shape[2])
        cache = KVCache.wrap(list(kv[0::2]), list(kv[1::2]))
        params = {name: weights[i] for name, i in zip(self.names, self.index)}
        logits = torch.func.functional_call(self.model, params, (token,),
                                            {"cache": cache, "input_pos": pos, "last_only": True})
        return logits[:, -1].float()


class _BatchDecodeStep(_DecodeStep):
    """forward(tokens [B, 1], positions [B], rows [B], span [S], *caches, *weights) -> logits [B, vocab] float32.

    One new token for each of B requests, each at its own position in its own cache row (the server's
    continuous batch); S = the furthest position + 1. The caches are the full [slots, n_kv, max_len, D] tensors.
    """

    def forward(self, tokens, positions, rows, span, *tensors):
        n_layers = self.model.config.num_hidden_layers
        kv, weights = tensors[:2 * n_layers], tensors[2 * n_layers:]
        torch._check(span.shape[0] <= kv[0].shape[2])
        cache = KVCache.wrap(list(kv[0::2]), list(kv[1::2]))
        params = {name: weights[i] for name, i in zip(self.names, self.index)}
        logits = torch.func.functional_call(self.model, params, (tokens,), {
            "cache": cache, "input_pos": positions, "rows": rows, "last_only": True, "span": span.shape[0]})
        return logits[:, -1].float()


def batch_path(path: Path) -> Path:
    """Where the batched step of the artifact at `path` lives (built together, batched one first)."""
    return path.with_name(f"{path.stem}-batch.pt2")


def _weight_slots(model: nn.Module):
    """Every parameter and buffer by name, with shared tensors (a tied embedding / head) passed once."""
    names, index, weights, seen = [], [], [], {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in seen:
            seen[key] = len(weights)
            weights.append(t.detach())
        names.append(name)
        index.append(seen[key])
    return names, index, weights


def _source_digest() -> str:
    """The traced code itself: any edit to the model package invalidates artifacts built from older code."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def signature(model: nn.Module, kv_dtype: torch.dtype) -> dict:
    """Everything the compiled code depends on. Two models with equal signatures share one artifact."""
    _, _, weights = _weight_slots(model)
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
    from ..store import home
    digest = hashlib.sha256(json.dumps(signature(model, kv_dtype), sort_keys=True).encode()).hexdigest()[:24]
    return home() / "compiled" / f"decode-{digest}.pt2"


def build(model: nn.Module, out: Path, *, max_len: int = 64) -> Path:
    """Export and compile the decode steps of `model`: one stream into `out`, a batch beside it (`batch_path`).
    Both are written atomically, the batched one first, so `out` existing means both are there. Slow: ~2 min."""
    if next(model.parameters()).device.type != "cpu":
        raise CompileError("the compiled decode step is built for CPU models only")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        from torch.export import Dim  # imported here: the serving process never needs it
        model.inv_freq("cpu")  # computed before tracing, so it is a constant of the step and not traced state
        cache = model.new_cache(4, max_len)
        kv = [t for pair in zip(cache.k, cache.v) for t in pair]
        S, M = Dim("span", min=2, max=1 << 20), Dim("cache_len", min=3, max=1 << 20)
        B, R = Dim("batch", min=2, max=1 << 10), Dim("slots", min=2, max=1 << 12)
        step = _BatchDecodeStep(model).eval()
        example = (torch.zeros(3, 1, dtype=torch.long), torch.tensor([5, 9, 7]), torch.tensor([0, 2, 3]),
                   torch.empty(17, dtype=torch.uint8), *kv, *step.weights)
        dynamic = ({0: B}, {0: B}, {0: B}, {0: S}, (*[{0: R, 2: M}] * len(kv), *[None] * len(step.weights)))
        _export_compile(step, example, dynamic, batch_path(out))
        kv = [t[:1] for t in kv]
        step = _DecodeStep(model).eval()
        example = (torch.zeros(1, 1, dtype=torch.long), torch.empty(17, dtype=torch.uint8), *kv, *step.weights)
        dynamic = (None, {0: S}, (*[{2: M}] * len(kv), *[None] * len(step.weights)))
        _export_compile(step, example, dynamic, out)
        _prune(out.parent, keep=out)
    except Exception as e:  # export/inductor raise many types; the caller needs "it did not work, and why"
        raise CompileError(f"compiling the decode step failed: {type(e).__name__}: {e}") from e
    return out


def _export_compile(step: nn.Module, example: tuple, dynamic: tuple, out: Path) -> None:
    from torch._inductor import aoti_compile_and_package
    from torch.export import export
    from .._fs import atomic_file
    with atomic_file(out) as tmp:
        tmp.unlink()  # the packager writes the file itself (and wants the .pt2 suffix)
        pt2 = tmp.with_name(tmp.name + ".pt2")
        try:
            with torch.inference_mode(False), torch.no_grad():
                exported = export(step, example, dynamic_shapes=dynamic)
                aoti_compile_and_package(exported, package_path=str(pt2))
            os.replace(pt2, tmp)
        finally:
            pt2.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- running
class CompiledDecoder:
    """Runs the compiled steps: `step(token_id, cache, pos, row)` -> logits [vocab] float32 for one stream, and
    `step.batch(token_ids, cache, positions, rows)` -> logits [B, vocab] for several (None if not built)."""

    def __init__(self, model: nn.Module, path: Path):
        self.path = Path(path)
        self.kv_dtype = model.kv_dtype or torch.float32
        self.weights = _weight_slots(model)[2]
        # The C++ runner directly: `torch._inductor.aoti_load_package` would import inductor's Python side.
        self._runner = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, -1)
        batch = batch_path(self.path)
        self._batch_runner = (torch._C._aoti.AOTIModelPackageLoader(str(batch), "model", False, 1, -1)
                              if batch.exists() else None)
        self._token = torch.zeros(1, 1, dtype=torch.long)
        self._span = torch.empty(1024, dtype=torch.uint8)
        self._key, self._tail = None, []
        self._batch_key, self._batch_tail = None, []

    def supports(self, cache: KVCache) -> bool:
        return (not cache.static and cache.dtype == self.kv_dtype and cache.k[0].device.type == "cpu"
                and cache.k[0].is_contiguous())

    def _span_of(self, n: int) -> torch.Tensor:
        if self._span.numel() < n:
            self._span = torch.empty(2 * n, dtype=torch.uint8)
        return self._span[:n]

    def __call__(self, token: int, cache: KVCache, pos: int, row: int = 0) -> torch.Tensor:
        if not 1 <= pos < cache.max_seq_len:
            raise ValueError(f"position {pos} is outside 1..{cache.max_seq_len - 1}")
        if self._key != (id(cache), row):  # the row's slice of each layer's cache, then the weights
            self._tail = [t[row:row + 1] for pair in zip(cache.k, cache.v) for t in pair] + self.weights
            self._key = (id(cache), row)
        self._token.fill_(token)
        return self._runner.run([self._token, self._span_of(pos + 1), *self._tail])[0][0]

    def batch(self, tokens: list[int], cache: KVCache, positions: list[int], rows: list[int]) -> torch.Tensor | None:
        if self._batch_runner is None or len(tokens) < 2:
            return None
        if not (len(tokens) == len(positions) == len(rows)) or len(set(rows)) != len(rows):
            raise ValueError("tokens, positions and rows must have one distinct row per token")
        top = max(positions)
        if min(positions) < 1 or top >= cache.max_seq_len or min(rows) < 0 or max(rows) >= cache.batch_size:
            raise ValueError(f"positions must be in 1..{cache.max_seq_len - 1} and rows in "
                             f"0..{cache.batch_size - 1}")
        if self._batch_key != id(cache):
            self._batch_tail = [t for pair in zip(cache.k, cache.v) for t in pair] + self.weights
            self._batch_key = id(cache)
        ins = [torch.tensor(tokens, dtype=torch.long)[:, None], torch.tensor(positions, dtype=torch.long),
               torch.tensor(rows, dtype=torch.long), self._span_of(top + 1)]
        return self._batch_runner.run(ins + self._batch_tail)[0]


def attach(lm, *, build_missing: bool | str = "background") -> CompiledDecoder | None:
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


def current(lm) -> CompiledDecoder | None:
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


def _prune(folder: Path, keep: Path, max_files: int = KEEP_ARTIFACTS) -> None:
    """Drop the least recently used artifacts beyond `max_files` (each is a few MB; code updates orphan them)."""
    found = sorted((p for p in folder.glob("decode-*.pt2") if not p.stem.endswith("-batch")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in found if p != keep][max_files - 1:]:
        for f in (old, batch_path(old), old.with_suffix(".log"), old.with_suffix(".lock"),
                  old.with_suffix(".failed")):
            f.unlink(missing_ok=True)


def decode_batch(lm, tokens: list[int], cache: KVCache, positions: list[int], rows: list[int]):
    """Logits [B, vocab] for one new token in each of several cache rows through the compiled batched step, or
    None when it is not available (the caller then runs the eager batched forward)."""
    step = current(lm)
    if step is None or not step.supports(cache):
        return None
    return step.batch(tokens, cache, positions, rows)


def _open(model, path: Path) -> CompiledDecoder | None:
    try:
        os.utime(path)  # "recently used", for _prune
        return CompiledDecoder(model, path)
    except (RuntimeError, OSError):  # corrupt, foreign or unreadable: drop it, the eager path is always there
        path.unlink(missing_ok=True)
        return None


def _failed_recently(path: Path) -> bool:
    """A build that failed in the last day is not retried in the background (`llamaforge compile` still can)."""
    marker = path.with_suffix(".failed")
    try:
        return time.time() - marker.stat().st_mtime < _RETRY_FAILED_S
    except FileNotFoundError:
        return False


def _start_background_build(lm, path: Path) -> None:
    lock = path.with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = lock.stat()
        pid = int(lock.read_text() or 0)
        from ..store import _pid_alive
        if time.time() - st.st_mtime < _LOCK_STALE_S and pid > 0 and _pid_alive(pid):
            return  # someone is building it already
        lock.unlink(missing_ok=True)
    except (FileNotFoundError, ValueError):
        pass
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return
    quant = lm.metadata.get("quant") or "none"
    cmd = [sys.executable, "-m", "llamaforge.model.aot", str(lm.path), "--quant", quant,
           "--threads", str(torch.get_num_threads()), "--out", str(path), "--lock", str(lock), "--idle"]
    log = open(path.with_suffix(".log"), "wb")
    # No preexec_fn (unsafe in threaded servers): the child lowers its own priority.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    os.write(fd, str(proc.pid).encode())
    os.close(fd)


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


def main(argv=None) -> int:
    """`python -m llamaforge.model.aot MODEL --quant Q --out FILE`: the build process."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m llamaforge.model.aot")
    ap.add_argument("model")
    ap.add_argument("--quant", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--lock", default=None)
    ap.add_argument("--force", action="store_true", help="rebuild even when the artifact is cached")
    ap.add_argument("--idle", action="store_true", help="run only on otherwise idle CPU (background builds)")
    a = ap.parse_args(argv)
    out = Path(a.out) if a.out else None
    try:
        if a.idle:
            _idle_priority()
        if a.threads:
            torch.set_num_threads(a.threads)
        from ..api import load
        t0 = time.perf_counter()
        lm = load(a.model, quant=a.quant, compile=False)
        out = out or artifact_path(lm.model, lm.model.kv_dtype or torch.float32)
        if out.exists() and not a.force:
            print(f"compiled decode step: {out} (cached)")
            return 0
        build(lm.model, out)
        out.with_suffix(".failed").unlink(missing_ok=True)
        print(f"compiled decode step -> {out} ({time.perf_counter() - t0:.0f} s)")
        return 0
    except LlamaforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        if out is not None:
            out.with_suffix(".failed").write_text(f"{e}\n", encoding="utf-8")
        return 1
    finally:
        if a.lock:
            Path(a.lock).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
