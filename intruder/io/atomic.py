"""Atomic outputs: write to a temporary name beside the target, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterable, Iterator

from ..errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_mode(path: str, is_dir: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; outputs get the usual umask-derived mode instead."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def _real(p: str) -> str:
    return os.path.realpath(os.path.abspath(p))


def check_output(path: str, inputs: Iterable[str] = ()) -> str:
    """Refuse an output path that is an input, lies inside an input directory, or contains one."""
    out = _real(path)
    for inp in inputs:
        if not inp:
            continue
        src = _real(inp)
        if out == src:
            raise OutputError(f"{path}: output would overwrite the input {inp}")
        if os.path.isdir(src) and os.path.commonpath([src, out]) == src:
            raise OutputError(f"{path}: output would be written inside the input directory {inp}")
    parent = os.path.dirname(out) or "."
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: directory {os.path.dirname(path) or '.'} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: directory {os.path.dirname(path) or '.'} is not writable")
    return out


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", durable: bool = True) -> Iterator:
    """Yield a file handle on a temporary sibling; rename onto `path` only on success.
    durable: fsync before the rename (outputs); a cache whose damaged entries are misses
    anyway may skip it."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        _ordinary_mode(tmp, is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    try:
        with atomic_file(path, "w") as fh:
            fh.write(text)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})")


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary directory beside `path`; it replaces `path` only on success."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create ({exc.strerror})")
    try:
        yield tmp
        _ordinary_mode(tmp, is_dir=True)
        if os.path.isdir(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
