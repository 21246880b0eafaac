"""Output targets, checked together before any work: the one gate every command's outputs pass.

    check_targets([Target("r.json", "-o"), Target("r.html", "--html")], inputs=[base, tuned])

A target is refused, with one line naming it, when it

- is an input: the same resolved path, inside an input directory (also when the folders leading
  to it do not exist yet), or the same file by device and inode (a hard link to an input file, or
  to any file inside an input directory, such as a model shard);
- is the same as another target of the same command (`scan -o x --html x`), or lies inside a
  directory target that is replaced whole;
- exists and is not what would be written: a symbolic link, a FIFO, a socket or a device node
  (never replaced: an atomic rename onto `/dev/null` would swap the system's device node for a
  regular file), a directory where a file goes, a file where a directory goes;
- has no usable parent: a missing folder (unless the command creates it), a parent that is a
  file, or a folder that is not writable.

Writing itself stays with intruder.io.atomic (temporary sibling, rename at the end), which also
refuses to rename onto a non-regular file should one appear after this check.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..errors import OutputError

FILE = "file"  # a file written whole
DIR = "dir"  # a directory written whole (replaces what is there)
CONTAINER = "container"  # a directory that receives files (its other contents are kept)
ANY = "any"  # a file or a directory written whole, whichever the writer decides

_WALK_MAX_ENTRIES = 100_000  # files of an input directory compared by inode
_WALK_MAX_DEPTH = 6


@dataclass(frozen=True)
class Target:
    """One path a command will write."""

    path: str
    what: str = "output"  # how messages name it: "-o", "--html", "scale-results.json" ...
    kind: str = FILE  # FILE | DIR | CONTAINER | ANY
    make_parents: bool = False  # the command creates missing parent folders


def _real(p: str) -> str:
    return os.path.realpath(os.path.abspath(p))


def _inside(child: str, parent: str) -> bool:
    try:
        return os.path.commonpath([parent, child]) == parent
    except ValueError:  # different drives
        return False


def file_kind(mode: int) -> str:
    """'a FIFO', 'a character device' ... for messages."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a parent is a file: reported by the parent check
        return None
    except OSError as exc:
        raise OutputError(f"{path}: cannot inspect the output path ({exc.strerror})") from exc


def _input_inodes(inputs: Sequence[str]) -> dict[tuple[int, int], str]:
    """(device, inode) -> input path, for every input file and every file inside an input
    directory (links followed, as a reader follows them)."""
    out: dict[tuple[int, int], str] = {}
    seen = 0
    for inp in inputs:
        try:
            st = os.stat(inp)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            out.setdefault((st.st_dev, st.st_ino), inp)
            continue
        stack = [(inp, 0)]
        while stack and seen < _WALK_MAX_ENTRIES:
            d, depth = stack.pop()
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                seen += 1
                try:
                    est = e.stat()  # follows links: a snapshot's link names its blob
                except OSError:
                    continue
                if stat.S_ISDIR(est.st_mode):
                    if depth + 1 < _WALK_MAX_DEPTH and not e.is_symlink():
                        stack.append((e.path, depth + 1))
                else:
                    out.setdefault((est.st_dev, est.st_ino), e.path)
    return out


def _check_parent(t: Target, real: str) -> None:
    """The folder `t` goes into exists (or may be created), is a folder and is writable."""
    parent = os.path.dirname(real)
    shown = os.path.dirname(t.path) or "."
    missing = []
    p = parent
    while True:
        st = _lstat(p)
        if st is not None:
            break
        missing.append(p)
        up = os.path.dirname(p)
        if up == p:
            break
        p = up
    if st is None:
        raise OutputError(f"{t.path}: no existing folder above it")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{t.path}: {p} is {file_kind(st.st_mode)}, not a directory")
    if missing and not t.make_parents:
        raise OutputError(f"{t.path}: directory {shown} does not exist")
    if not os.access(p, os.W_OK | os.X_OK):
        where = shown if not missing else p
        raise OutputError(f"{t.path}: directory {where} is not writable")


def _check_existing(t: Target, st: os.stat_result) -> None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        if t.kind == CONTAINER and os.path.isdir(t.path):
            return  # files are written inside the folder it points to; the link stays
        raise OutputError(f"{t.path}: {t.what} is a symbolic link; refusing to replace it "
                          f"(name the file it points to, or another path)")
    if t.kind == ANY:
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise OutputError(f"{t.path}: {t.what} is {file_kind(mode)}; refusing to replace it")
    elif t.kind == FILE:
        if stat.S_ISDIR(mode):
            raise OutputError(f"{t.path}: {t.what} is a directory")
        if not stat.S_ISREG(mode):
            raise OutputError(f"{t.path}: {t.what} is {file_kind(mode)}, not a regular file; "
                              f"refusing to replace it")
    elif not stat.S_ISDIR(mode):
        raise OutputError(f"{t.path}: {t.what} exists and is {file_kind(mode)}, not a directory")


def check_targets(targets: Iterable[Target], inputs: Iterable[str | None] = ()) -> list[str]:
    """Refuse the first unsafe target (OutputError, one line); return the resolved paths."""
    targets = [t for t in targets if t is not None and t.path]
    in_paths = [i for i in inputs if i]
    real_inputs = [(i, _real(i), os.path.isdir(i)) for i in in_paths]
    inodes: dict[tuple[int, int], str] | None = None
    reals: list[str] = []
    seen: dict[str, Target] = {}
    seen_ino: dict[tuple[int, int], Target] = {}
    for t in targets:
        real = _real(t.path)
        st = _lstat(t.path)
        for given, src, is_dir in real_inputs:
            if real == src:
                raise OutputError(f"{t.path}: {t.what} output would overwrite the input {given}")
            if is_dir and _inside(real, src):
                raise OutputError(f"{t.path}: {t.what} output would be written inside the "
                                  f"input directory {given}")
            if t.kind in (DIR, ANY) and _inside(src, real):
                raise OutputError(f"{t.path}: {t.what} would replace a directory holding the "
                                  f"input {given}")
        if st is not None:
            _check_existing(t, st)
            if stat.S_ISREG(st.st_mode):
                if inodes is None:
                    inodes = _input_inodes(in_paths)
                hit = inodes.get((st.st_dev, st.st_ino))
                if hit is not None:
                    raise OutputError(f"{t.path}: {t.what} is the same file as the input {hit} "
                                      f"(a hard link); writing it would change the input")
                other = seen_ino.get((st.st_dev, st.st_ino))
                if other is not None:
                    raise OutputError(f"{t.path}: {t.what} is the same file as {other.what} "
                                      f"{other.path}")
                seen_ino[(st.st_dev, st.st_ino)] = t
        other = seen.get(real)
        if other is not None:
            raise OutputError(f"{t.path}: {t.what} and {other.what} name the same path; one "
                              f"would overwrite the other")
        for o_real, o in seen.items():
            for a, a_real, b, b_real in ((t, real, o, o_real), (o, o_real, t, real)):
                if b.kind in (DIR, ANY) and _inside(a_real, b_real):
                    raise OutputError(f"{a.path}: {a.what} lies inside {b.what} {b.path}, which "
                                      f"is replaced whole")
        seen[real] = t
        _check_parent(t, real)
        reals.append(real)
    return reals


def create_parents(path: str) -> list[str]:
    """Create the missing folders above `path`; return them, deepest first, for removal on
    failure."""
    made: list[str] = []
    p = os.path.dirname(os.path.abspath(path))
    while p and not os.path.lexists(p):
        made.append(p)
        up = os.path.dirname(p)
        if up == p:
            break
        p = up
    for d in reversed(made):
        try:
            os.mkdir(d)
        except FileExistsError:
            pass
        except OSError as exc:
            remove_dirs(made)
            raise OutputError(f"{path}: cannot create directory {d} ({exc.strerror})") from exc
    return made


def create_dir(path: str) -> list[str]:
    """Create the directory `path` with its parents; return what was created, deepest first."""
    return create_parents(os.path.join(path, "x"))


def remove_dirs(made: Sequence[str]) -> None:
    """Remove folders created by create_parents that are still empty (deepest first)."""
    for d in made:
        try:
            os.rmdir(d)
        except OSError:
            break


__all__ = ["ANY", "CONTAINER", "DIR", "FILE", "Target", "check_targets", "create_dir",
           "create_parents", "file_kind", "remove_dirs"]
