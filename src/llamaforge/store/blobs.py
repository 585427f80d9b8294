"""The store's files: content-addressed blobs, directory views (trees) of them, and housekeeping.

    blobs/sha256-<hex>      one file per content (weights, configs, tokenizers, adapters)
    trees/<hex>/...         a multi-file model as a directory of relative symlinks to its blobs

Crash safety: every file is written to a temp file in its target directory (name carries the writer's pid), then
fsync + `os.replace` + directory fsync. Temp files of writers that died are removed the next time a store is
opened (those of writers still alive are left alone).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from .._fs import fsync_dir, io_errors as _io_errors, temp_path, write_all
from ..errors import StoreError
from .manifests import canonical, check_digest, check_relpath

CHUNK = 1 << 20
# Temp files end in `.<pid>.<random>.tmp` (or `.partial` for blobs) so an opening store can tell whose they are.
TEMP_RE = re.compile(r"^\..*\.(\d+)\.[0-9a-f]{8}\.(tmp|partial)$")
_STALE_SECONDS = 24 * 3600


def home() -> Path:
    """The store root: `$LLAMAFORGE_HOME`, else `~/.llamaforge`."""
    env = os.environ.get("LLAMAFORGE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".llamaforge"


# ------------------------------------------------------------------------------------------------------ io helpers
@contextlib.contextmanager
def io_errors(what: str):
    """Turn OSError into a one-line StoreError (ENOSPC spelled out): `_fs.io_errors` with the store's error."""
    with _io_errors(what, StoreError):
        yield


def pid_alive(pid: int) -> bool:
    """True if process `pid` exists (ours counts; one we may not signal counts too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def progress_bar(total: int, desc: str, progress):
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




def tree_id(entries: list[tuple[str, str]]) -> str:
    """The name of the directory view of sorted (relative path, hex digest) entries."""
    return hashlib.sha256(canonical(entries)).hexdigest()


class BlobStore:
    """The files of a store at `root`: blobs and trees (the catalog of names on top is `store.Store`).
    Opening it removes temp files left by dead writers."""

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
                if m and not pid_alive(int(m.group(1))):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        for top in (self.manifests, self.blobs, self.trees):
            if not top.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                for nm in list(dirnames) + filenames:
                    m = TEMP_RE.match(nm)
                    if not m:
                        continue
                    p = Path(dirpath) / nm
                    try:
                        stale = now - p.lstat().st_mtime > _STALE_SECONDS
                    except OSError:
                        continue
                    if pid_alive(int(m.group(1))) and not stale:
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

    def blob_path(self, digest: str) -> Path:
        return self.blobs / f"sha256-{check_digest(digest)}"

    def tree(self, files: list, name: str) -> Path:
        """A directory of relative symlinks to the blobs of `files` (content-addressed, built atomically)."""
        if not isinstance(files, list) or not files:
            raise StoreError(f"corrupt manifest of {name}: empty file list")
        entries = []
        for f in files:
            if not isinstance(f, dict):
                raise StoreError(f"corrupt manifest of {name}: bad file entry")
            entries.append((check_relpath(f.get("path")), check_digest(f.get("digest"))))
        entries.sort()
        final = self.trees / tree_id(entries)
        for rel, hexd in entries:
            if not (self.blobs / f"sha256-{hexd}").is_file():
                raise StoreError(f"model {name} is damaged: blob for {rel} is missing; pull it again")
        if final.is_dir() and all((final / rel).exists() for rel, _ in entries):
            return final
        with io_errors(f"cannot build the directory view of {name}"):
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


    def import_file(self, src: Path, *, expected_digest: str | None = None, progress=None,
                    _update: Callable[[int], None] | None = None,
                    _created: list | None = None) -> tuple[str, int]:
        """Copy a file into the blobs, hashing as it goes. Returns ("sha256:<hex>", size).

        A digest mismatch deletes the new blob and raises StoreError; nothing else is changed.
        """
        expected = None
        if expected_digest is not None:
            e = expected_digest.lower()
            expected = check_digest(e if e.startswith("sha256:") else "sha256:" + e)
        with io_errors(f"cannot copy {src} into the store"):
            size = os.stat(src).st_size
            own_bar = _update is None
            update, close = progress_bar(size, Path(src).name, progress) if own_bar else (_update, lambda: None)
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


    def prune_unreferenced(self, digests: set[str], trees: set[str]) -> int:
        """Delete blobs whose hex digest is not in `digests` and trees not in `trees`; returns bytes freed."""
        freed = 0
        if self.blobs.is_dir():
            for b in self.blobs.glob("sha256-*"):
                if b.name[7:] not in digests:
                    with contextlib.suppress(OSError):
                        freed += b.lstat().st_size   # a planted link: its own size, never its target's
                        b.unlink()                   # unlinks a link itself, never what it points to
        if self.trees.is_dir():
            for t in self.trees.iterdir():
                if re.fullmatch(r"[0-9a-f]{64}", t.name) and t.name not in trees:
                    if t.is_symlink():   # rmtree refuses links; remove the link, never the directory it names
                        with contextlib.suppress(OSError):
                            t.unlink()
                    else:
                        shutil.rmtree(t, ignore_errors=True)   # does not follow links inside the tree
        return freed

    def verify_blob(self, digest: str, owner: str) -> None:
        """Re-hash one blob; if its bytes do not match its digest it is deleted and StoreError names `owner`."""
        hexd = check_digest(digest)
        p = self.blobs / f"sha256-{hexd}"
        with io_errors(f"cannot read {p}"):
            h = hashlib.sha256()
            with open(p, "rb") as fin:
                for chunk in iter(lambda: fin.read(CHUNK), b""):
                    h.update(chunk)
        if h.hexdigest() != hexd:
            with contextlib.suppress(OSError):
                p.unlink()
            raise StoreError(f"blob {p.name} of {owner} is corrupt (sha256 {h.hexdigest()}); it was deleted, "
                             "pull the model again")
