"""Atomic outputs: write to a temporary name beside the target, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator

from ..errors import OutputError
from .targets import ANY, Target, check_targets, file_kind


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_mode(path: str, is_dir: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; outputs get the usual umask-derived mode instead."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def check_output(path: str, inputs: Iterable[str] = (), what: str = "output",
                 kind: str = ANY) -> str:
    """One output (a file or a directory written whole): refused when it is an input (by path or
    inode), lies inside an input directory, or exists and is a link, FIFO, device or socket
    (intruder.io.targets); return its real path."""
    return check_targets([Target(path, what, kind)], inputs)[0]


def _refuse_special(path: str, want_dir: bool) -> None:
    """Last check before the rename: never replace a link, FIFO, device or socket (nor a file with
    a directory, or a directory with a file), whatever appeared since the up-front check."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not ok:
        raise OutputError(f"{path}: is {file_kind(st.st_mode)}; refusing to replace it")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", durable: bool = True) -> Iterator:
    """Yield a file handle on a temporary sibling; rename onto `path` only on success.
    durable: fsync before the rename (outputs); a cache whose damaged entries are misses
    anyway may skip it."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from exc
    try:
        # text: UTF-8 whatever the locale (LANG=C), a name that is not valid Unicode escaped
        binary = "b" in mode
        with os.fdopen(fd, mode, encoding=None if binary else "utf-8",
                       errors=None if binary else "backslashreplace") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        _ordinary_mode(tmp, is_dir=False)
        _refuse_special(path, want_dir=False)
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
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from exc


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary directory beside `path`; it replaces `path` only on success."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.", dir=parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create ({exc.strerror})") from exc
    try:
        yield tmp
        _ordinary_mode(tmp, is_dir=True)
        _refuse_special(path, want_dir=True)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(src: str, dst: str) -> None:
    """Rename `src` to `dst`; a directory replacing a directory sets the old one aside first
    (removed once the new one is in place), since a rename cannot replace a non-empty folder."""
    if os.path.isdir(src) and os.path.isdir(dst):
        old = src + ".old"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def staging_path(path: str) -> str:
    """A fresh hidden name beside `path` (not created) for an output that must appear only when
    a whole run succeeds: write there, then commit_staged. Same folder, so the rename is atomic."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    base = os.path.basename(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.staged-", dir=parent)
    os.close(fd)
    os.unlink(tmp)  # only the unique name is kept; the writer creates it
    return tmp + (".safetensors" if base.endswith(".safetensors") else "")


def commit_staged(pairs: Iterable[tuple]) -> None:
    """Rename each (staged, final) into place, in order; a directory replaces the previous one
    (kept aside until the new one is in place)."""
    for staged, final in pairs:
        _refuse_special(final, want_dir=os.path.isdir(staged))
        _move_into_place(staged, final)


def discard_staged(paths: Iterable[str]) -> None:
    """Remove staged outputs that were not committed (a failed or interrupted run)."""
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)
