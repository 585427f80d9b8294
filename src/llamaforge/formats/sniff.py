"""The one format sniffer: what a path holds, told by content and marker files, never by its name alone.

    GGUF file                      magic bytes "GGUF"                              -> "gguf"
    directory with one *.gguf      that file                                       -> "gguf"
    Hugging Face directory         config.json (+ *.safetensors)                   -> "hf"
    Meta directory                 params.json (+ consolidated.*.pth)              -> "meta"

`sniff(path)` decides; `detect_format(path)` is the loaders' form (raises `ModelFormatError`). With
`complete=True` the weights must be there too and a GGUF must be a llama one (read from its header alone): what
the store checks before it copies anything. The loaders sniff leniently, so that a directory with, say, only
pickled weights gets the loader's own, more precise refusal.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFormatError
from ..gguf_header import is_gguf, read_header

FORMATS = ("gguf", "hf", "meta")
_META_WEIGHTS = re.compile(r"consolidated\.\d+\.pth")
_NOT_A_MODEL_DIR = ("not a model directory (expected config.json + *.safetensors (Hugging Face), params.json + "
                    "consolidated.*.pth (Meta) or a single .gguf file)")


@dataclass(frozen=True)
class Sniffed:
    """format: "gguf", "hf", "meta", or None when `path` is not a model; weights: the GGUF file itself (also
    when `path` is a directory holding one) or the model directory; problem: why it is not (a complete)
    model."""

    format: str | None
    weights: Path
    problem: str | None = None   # "path: problem" reads as one line

    def error(self) -> ModelFormatError:
        return ModelFormatError(self.weights, self.problem or "not a model")


def sniff(path, *, complete: bool = False) -> Sniffed:
    """What `path` holds (see the module docstring). Never raises for "not a model" (see `Sniffed.problem`);
    with complete=True an unreadable or malformed GGUF header raises `ModelFormatError`."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Sniffed(None, path, "no such file or directory")
    except OSError as e:
        return Sniffed(None, path, f"cannot read: {e.strerror or e}")
    if stat.S_ISREG(st.st_mode):
        if not is_gguf(path):
            return Sniffed(None, path, "not a GGUF file (a single-file model must be GGUF; pass the directory of "
                                       "a Hugging Face or Meta checkpoint)")
        return _gguf(path, complete)
    if not stat.S_ISDIR(st.st_mode):
        return Sniffed(None, path, "neither a regular file nor a directory")
    if (path / "config.json").is_file():
        if complete and not any(path.glob("*.safetensors")):
            return Sniffed("hf", path, "no .safetensors weights beside config.json (pickled .bin weights are not "
                                       "accepted)")
        return _validated(Sniffed("hf", path)) if complete else Sniffed("hf", path)
    if (path / "params.json").is_file():
        if complete and not any(_META_WEIGHTS.fullmatch(p.name) for p in path.glob("consolidated.*.pth")):
            return Sniffed("meta", path, "no consolidated.*.pth weights beside params.json")
        return _validated(Sniffed("meta", path)) if complete else Sniffed("meta", path)
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1 and is_gguf(ggufs[0]):
        return _gguf(ggufs[0], complete)
    return Sniffed(None, path, _NOT_A_MODEL_DIR)


def _gguf(path: Path, complete: bool) -> Sniffed:
    if complete:
        arch = read_header(path, tensors=False).metadata.get("general.architecture")
        if arch != "llama":
            return Sniffed("gguf", path, f"unsupported architecture {arch!r} (only llama)")
        return _validated(Sniffed("gguf", path))
    return Sniffed("gguf", path)


def _validated(found: Sniffed) -> Sniffed:
    """A complete model must also load: its architecture numbers checked against its tensor table (no weights
    read). A GGUF that passes the header checks but could never load is a problem, not a model."""
    from .validate import validate_architecture
    try:
        validate_architecture(found.format, found.weights)
    except ModelFormatError as e:
        return Sniffed(found.format, found.weights, e.reason)
    return found


def detect_format(path) -> tuple[str, Path]:
    """(format, weights path) of a model file or directory, for the loaders; ModelFormatError if it is none."""
    s = sniff(path)
    if s.problem:
        raise s.error()
    return s.format, s.weights


def is_model_dir(path) -> bool:
    """True for a directory the loaders would take as a model (leniently, as `detect_format`)."""
    p = Path(path)
    return p.is_dir() and sniff(p).format is not None
