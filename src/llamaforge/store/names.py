"""Model names: `[namespace/]model[:tag]`, validated before anything touches the disk, and name-vs-path."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..formats.sniff import is_model_dir

DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LEN = 128
MAX_PART_LEN = 64
_PART_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_TAG_RE = re.compile(r"[a-z0-9_][a-z0-9_.-]*")


@dataclass(frozen=True)
class ModelName:
    """A validated model name: `[namespace/]model[:tag]`, lower-cased (names are case-insensitive, as in Ollama)."""

    namespace: str
    model: str
    tag: str

    def __str__(self) -> str:
        base = self.model if self.namespace == DEFAULT_NAMESPACE else f"{self.namespace}/{self.model}"
        return f"{base}:{self.tag}"

    @property
    def short(self) -> str:
        """Name without the default tag (`smollm2` rather than `smollm2:latest`)."""
        s = str(self)
        return s[: -len(":" + DEFAULT_TAG)] if self.tag == DEFAULT_TAG else s


def parse_name(name: Any) -> ModelName:
    """Validate a model name without touching the disk. Raises StoreError naming what is wrong."""
    if not isinstance(name, str):
        raise StoreError(f"model name must be a string, got {type(name).__name__}")
    shown = name.encode("unicode_escape").decode("ascii")[:80]

    def bad(reason: str) -> StoreError:
        return StoreError(f"invalid model name '{shown}': {reason}")

    if not name:
        raise bad("empty")
    if len(name) > MAX_NAME_LEN:
        raise bad(f"longer than {MAX_NAME_LEN} characters")
    if "\x00" in name:
        raise bad("contains a NUL character")
    if "\\" in name:
        raise bad("contains a backslash")
    if name.startswith("/") or os.path.isabs(name):
        raise bad("is an absolute path")
    if ".." in name:
        raise bad("contains '..'")
    lowered = name.lower()
    base, sep, tag = lowered.partition(":")
    if not sep:
        tag = DEFAULT_TAG
    elif ":" in tag:
        raise bad("more than one ':'")
    parts = base.split("/")
    if len(parts) > 2:
        raise bad("at most one '/' (namespace/model)")
    namespace, model = (parts if len(parts) == 2 else [DEFAULT_NAMESPACE, parts[0]])
    for what, part, rx in (("namespace", namespace, _PART_RE), ("model", model, _PART_RE), ("tag", tag, _TAG_RE)):
        if not part:
            raise bad(f"empty {what}")
        if len(part) > MAX_PART_LEN:
            raise bad(f"{what} longer than {MAX_PART_LEN} characters")
        if not rx.fullmatch(part):
            raise bad(f"{what} {part!r} may only use letters, digits, '_', '-', '.' and must start with a letter "
                      "or digit")
    return ModelName(namespace, model, tag)


def default_name_for(source: str | Path) -> str:
    """A store name derived from a file/directory/repo name: lower-cased, invalid characters replaced by '-'."""
    stem = Path(str(source).rstrip("/")).name
    if stem.lower().endswith(".gguf"):
        stem = stem[:-5]
    stem = re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).replace("..", ".").strip("-._")[:MAX_PART_LEN]
    return stem.strip("-._") or "model"


def split_name(s: str) -> tuple[str, str, str]:
    """(namespace, model, tag) of a valid name."""
    n = parse_name(s)
    return n.namespace, n.model, n.tag


def spelled_as_path(s: str) -> bool:
    """Written as a path whatever exists on disk: ./x, ../x, /x, ~/x, a/b, x.gguf."""
    return bool(s) and (s.startswith((".", "/", "~")) or s.lower().endswith(".gguf") or os.sep in s)


def looks_like_model_path(s: str) -> bool:
    """An existing file or model directory, or something spelled like a path (./x, ~/x, x.gguf), rather than a
    store name. Directories count when the format sniffer takes them for a model."""
    if not s or "\x00" in s:
        return False
    if s.startswith((".", "/", "~")) or s.lower().endswith(".gguf") or os.sep in s and os.path.exists(s):
        return True
    p = Path(s)
    try:
        return p.is_file() or is_model_dir(p)
    except OSError:
        return False
