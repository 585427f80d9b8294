"""Manifests: the JSON record of one model (weights by digest, defaults) and the facts derived from it.

A manifest names exactly one of `weights` (a single GGUF blob), `files` (a directory, one blob per file) or
`external` (a file outside the store, e.g. the built-in model's package file), plus `defaults` (system prompt,
options, template, adapter files). Manifests read from disk are checked structurally before use.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import StoreError

SCHEMA_VERSION = 1
DEFAULT_KEYS = ("system", "options", "template", "adapter", "messages", "license")
MESSAGE_ROLES = ("system", "user", "assistant")
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Resolved:
    """Where a model's weights are and how to run it.

    path: a GGUF file, or a model directory (HF/Meta). name: the store name, or None for a plain path.
    defaults: {"system", "options", "template", "adapter"}; adapter is a PEFT adapter directory path or None.
    """

    path: Path
    name: str | None
    defaults: dict = field(default_factory=dict)
    manifest: dict | None = field(default=None, compare=False, repr=False)
    builtin: bool = False


@dataclass(frozen=True)
class ModelEntry:
    """One row of `Store.list()`."""

    name: str
    id: str            # first 12 hex digits of the manifest's content digest (same weights + defaults = same id)
    size: int          # bytes of weights (and adapter) referenced
    modified: float    # POSIX time
    format: str
    builtin: bool = False


def empty_defaults() -> dict:
    return {"system": None, "options": {}, "template": None, "adapter": None}


def check_digest(d: Any) -> str:
    m = _DIGEST_RE.fullmatch(d) if isinstance(d, str) else None
    if not m:
        raise StoreError(f"corrupt manifest: bad digest {d!r}")
    return m.group(1)


def check_relpath(p: Any) -> str:
    """A relative path inside a model directory, as stored in a manifest: no traversal, no absolute parts."""
    if not isinstance(p, str) or not p or len(p) > 512 or "\x00" in p or "\\" in p or p.startswith("/"):
        raise StoreError(f"corrupt manifest: bad file path {p!r}")
    parts = p.split("/")
    if any(part in ("", ".", "..") or len(part) > 255 for part in parts):
        raise StoreError(f"corrupt manifest: bad file path {p!r}")
    return p


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()



def now() -> str:
    """The current time as a manifest records it (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def manifest_files(man: dict) -> list[dict]:
    out = []
    if "weights" in man:
        out.append(man["weights"])
    out.extend(man.get("files") or [])
    ad = (man.get("defaults") or {}).get("adapter")
    if isinstance(ad, dict):
        out.extend(ad.get("files") or [])
    return out


def manifest_trees(man: dict) -> list[list]:
    out = []
    if man.get("files"):
        out.append(man["files"])
    ad = (man.get("defaults") or {}).get("adapter")
    if isinstance(ad, dict) and ad.get("files"):
        out.append(ad["files"])
    return out


def file_entry_problem(f: Any, what: str) -> str | None:
    if not isinstance(f, dict):
        return f"{what} is not an object"
    if not (isinstance(f.get("digest"), str) and _DIGEST_RE.fullmatch(f["digest"])):
        return f"{what} has a bad digest"
    size = f.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"{what} has a bad size"
    return None


def manifest_problem(man: dict) -> str | None:
    """What is structurally wrong with a manifest read from disk, or None. Paths are checked where used."""
    kinds = [k for k in ("weights", "files", "external") if k in man]
    if len(kinds) != 1:
        return "it must name exactly one of weights / files / external"
    if "weights" in man and (p := file_entry_problem(man["weights"], "weights")):
        return p
    if "files" in man:
        if not isinstance(man["files"], list) or not man["files"]:
            return "files is not a non-empty list"
        for f in man["files"]:
            if (p := file_entry_problem(f, "a file entry")) or not isinstance(f.get("path"), str):
                return p or "a file entry has no path"
    if "external" in man:
        ext = man["external"]
        if not isinstance(ext, dict) or not isinstance(ext.get("path"), str):
            return "external has no path"
    d = man.get("defaults", {})
    if not isinstance(d, dict):
        return "defaults is not an object"
    if any(d.get(k) is not None and not isinstance(d[k], str) for k in ("system", "template")):
        return "system / template is not text"
    if d.get("options") is not None and not isinstance(d["options"], dict):
        return "options is not an object"
    if d.get("license") is not None and not isinstance(d["license"], str):
        return "license is not text"
    msgs = d.get("messages")
    if msgs is not None and not (isinstance(msgs, list) and all(
            isinstance(m, dict) and m.get("role") in MESSAGE_ROLES and isinstance(m.get("content"), str)
            for m in msgs)):
        return "messages is not a list of {role, content} turns"
    ad = d.get("adapter")
    if ad is not None:
        if not isinstance(ad, dict) or not isinstance(ad.get("files"), list) or not ad["files"]:
            return "adapter has no file list"
        for f in ad["files"]:
            if (p := file_entry_problem(f, "an adapter file entry")) or not isinstance(f.get("path"), str):
                return p or "an adapter file entry has no path"
    return None


def manifest_size(man: dict) -> int:
    if "external" in man:
        base = int(man["external"].get("size") or 0)
        return base + sum(int(f.get("size") or 0) for f in manifest_files(man))
    return sum(int(f.get("size") or 0) for f in manifest_files(man))


def manifest_digest(man: dict) -> str:
    """The sha256 (64 hex digits) of what makes the model (weights + defaults), not of its name or dates: the
    digest Ollama's /api/tags and /api/ps report. Two names for the same model share it."""
    core = {k: man.get(k) for k in ("format", "weights", "files", "external", "defaults")}
    if core.get("external"):
        core["external"] = {"path": core["external"].get("path"), "size": core["external"].get("size")}
    return hashlib.sha256(canonical(core)).hexdigest()


def manifest_id(man: dict) -> str:
    """The first 12 hex digits of `manifest_digest` (the ID `llamaforge list` prints, as `ollama list`)."""
    return manifest_digest(man)[:12]

