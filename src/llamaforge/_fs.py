"""File-system helpers used by every part of the package: atomic writes and bounded reads.

Atomic writes build the result under a temporary name in the target directory, fsync it, rename it into place
and fsync the directory, so a crash leaves either the old file or the complete new one. Temporary names carry
the writer's pid (`.<name>.<pid>.<random>.<suffix>`), so the store can tell a dead writer's leftovers from a live
one's. Results get the permissions a plain `open()` would give them (the umask decides), not mkstemp's 0600.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import LlamaforgeError


class InputTooLargeError(LlamaforgeError):
    """A file or stream a user handed in is larger than the limit for what it is."""


def temp_path(directory: Path, base: str, suffix: str = "tmp") -> Path:
    """A fresh temporary name in `directory` carrying this process's pid."""
    return Path(directory) / f".{base}.{os.getpid()}.{secrets.token_hex(4)}.{suffix}"


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_all(fd: int, data) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path next to `path` (an empty file); on success fsync it and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path.parent, path.name)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def chmod_as_created(path) -> None:
    """Give `path` the permissions a file made by a plain `open()` gets (0666 less the umask), for files written
    by libraries that create them 0600 (safetensors' `save_file`). The mode is read off a fresh probe file in the
    same directory: the umask cannot be read without changing it, which is not thread-safe."""
    path = Path(path)
    probe = temp_path(path.parent, path.name, "mode")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        os.chmod(path, os.stat(probe).st_mode & 0o777)
    finally:
        probe.unlink(missing_ok=True)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path.parent, path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(dirpath) -> Iterator[Path]:
    """Yield a temporary directory next to `dirpath`; on success fsync its files and rename it into place.

    An existing `dirpath` is replaced; a crash leaves either the old directory or the complete new one (plus, at
    worst, a hidden temporary directory that `Store.cleanup` or the next writer removes).
    """
    dirpath = Path(dirpath)
    dirpath.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dirpath.parent, dirpath.name)
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file() and not p.is_symlink():
                _fsync_file(p)
        fsync_dir(tmp)
        if dirpath.exists():
            old = temp_path(dirpath.parent, dirpath.name, "old")
            os.replace(dirpath, old)
            os.replace(tmp, dirpath)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dirpath)
        fsync_dir(dirpath.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_bounded(source, limit: int, what: str = "input") -> bytes:
    """All bytes of a path or binary file object, refusing (InputTooLargeError) more than `limit` bytes.

    Reads at most limit + 1 bytes whatever the source claims to be, so /dev/zero or a growing pipe cannot
    exhaust memory.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                return read_bounded(f, limit, what)
        except OSError as e:
            raise LlamaforgeError(f"cannot read {what} {source}: {e.strerror or e}") from None
    f: BinaryIO = source
    data = f.read(limit + 1)
    if len(data) > limit:
        raise InputTooLargeError(f"{what} is larger than the limit of {_size(limit)}")
    return data


def read_text_bounded(source, limit: int, what: str = "input") -> str:
    data = read_bounded(source, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlamaforgeError(f"{what} is not valid UTF-8 (byte {e.start})") from None


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} bytes"


def loads_json(data, **kwargs):
    """`json.loads` for text from outside (files, request strings, model output): nesting deep enough to exhaust
    the parser's recursion is a `json.JSONDecodeError` like any other malformed JSON, never a RecursionError.
    Keyword arguments go to `json.loads` (e.g. `parse_constant` to refuse NaN/Infinity)."""
    import json
    try:
        return json.loads(data, **kwargs)
    except RecursionError:
        doc = data if isinstance(data, str) else ""
        raise json.JSONDecodeError("nested too deeply", doc, 0) from None


MAX_STDIN_BYTES = 64 << 20   # a prompt or question piped in: far beyond any context window


def read_stdin(limit: int = MAX_STDIN_BYTES, *, text: bool = True):
    """Standard input, at most `limit` bytes (InputTooLargeError beyond: `< /dev/zero` must not fill memory).
    Text is UTF-8 with invalid bytes replaced (U+FFFD), as a prompt should be; `text=False` gives the bytes."""
    import sys
    data = read_bounded(sys.stdin.buffer, limit, "standard input")
    return data.decode("utf-8", errors="replace") if text else data


class OutputError(LlamaforgeError):
    """Writing a result failed (disk full, quota, permissions); nothing partial was left in its place."""


@contextlib.contextmanager
def io_errors(what: str, error: type = OutputError):
    """Turn an OSError into one line naming `what` (ENOSPC and EDQUOT spelled out) as `error(message)`.
    The one mechanism for every writer: the store, convert, checkpoints."""
    import errno
    try:
        yield
    except LlamaforgeError:
        raise
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise error(f"{what}: no space left on device") from None
        if e.errno == errno.EDQUOT:
            raise error(f"{what}: disk quota exceeded") from None
        raise error(f"{what}: {e.strerror or e}") from None
