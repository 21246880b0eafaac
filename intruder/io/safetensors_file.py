"""A careful, lazy reader of one .safetensors file.

The header is parsed and validated by us (not trusted): 8-byte little-endian length, a JSON object
of {name: {dtype, shape, data_offsets}}, offsets contiguous, non-overlapping, inside the file and
consistent with shape x dtype size. Tensors are read one at a time with a positioned read, so
memory holds only the tensor asked for.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple

from ..errors import CheckpointError

# safetensors dtype -> (bytes per element, torch dtype name)
DTYPES: Mapping[str, Tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


class DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(k)
        out[k] = v
    return out


def strict_json(text: str):
    """json.loads that refuses duplicate keys (json would keep the last one silently).

    Raises ValueError (DuplicateKeyError for a repeated key; also a number too long to convert)
    or RecursionError (nesting bomb)."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def check_regular_file(path: str, what: str = "checkpoint") -> os.stat_result:
    """Refuse anything but a regular, readable file (no FIFOs, devices, sockets)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot stat ({exc.strerror})")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file ({_kind(st.st_mode)}); refusing to "
                              f"read it as a {what}")
    return st


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path: str, what: str = "checkpoint"):
    """Open a regular file for binary reading; return (file, stat of the open descriptor).

    The type is checked before opening (opening some devices has side effects) and again on the
    open descriptor, which is opened non-blocking: a file swapped for a FIFO or a device after the
    first check can neither block the open nor be read."""
    check_regular_file(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror})")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file ({_kind(st.st_mode)}); refusing to "
                              f"read it as a {what}")
    return os.fdopen(fd, "rb"), st


def parse_header(path: str) -> Tuple[Dict[str, TensorEntry], Dict[str, str], int]:
    """Parse and validate the header; return (entries, metadata, data start offset)."""
    fh, st = open_regular(path)
    size = st.st_size
    try:
        with fh:
            if size < 8:
                raise CheckpointError(f"{path}: file is empty" if size == 0 else
                                      f"{path}: file too short for a safetensors header "
                                      f"({size} bytes)")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length {n} exceeds the 100 MB limit")
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} is larger than the file ({size} bytes); truncated?")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})")
    try:
        header = strict_json(raw.decode("utf-8"))
    except DuplicateKeyError as exc:
        raise CheckpointError(f"{path}: header names {exc.key!r} twice; a duplicated entry "
                              f"would hide one of the two tensors")
    except (ValueError, RecursionError):  # bad UTF-8 / JSON, or a number too long to convert
        raise CheckpointError(f"{path}: header is not valid JSON; not a safetensors file?")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    entries: Dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, data_start, data_len)
    _check_layout(path, entries, data_len, data_start)
    return entries, metadata, data_start


def _entry(path: str, name: str, info, data_start: int, data_len: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offs = info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r}: invalid shape {shape!r}")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
        raise CheckpointError(f"{path}: tensor {name!r}: invalid data_offsets {offs!r}")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets {offs} outside the data section "
            f"({data_len} bytes); truncated file?")
    numel = 1
    for d in shape:
        numel *= d
    if numel * DTYPES[dtype][0] != end - begin:
        raise CheckpointError(
            f"{path}: tensor {name!r}: shape {shape} x {dtype} needs {numel * DTYPES[dtype][0]} "
            f"bytes but data_offsets span {end - begin}")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path: str, entries: Dict[str, TensorEntry], data_len: int, data_start: int):
    """Tensors must not overlap (a duplicated region would alias two weights)."""
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.end > e.start)
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")


def file_identity(st) -> Tuple[int, int, int, int, int]:
    """(device, inode, size, mtime ns, ctime ns): changes when a file is replaced or rewritten,
    even by tools that restore the mtime (`cp -p`, `rsync -a`)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class SafetensorsFile:
    """Lazy access to the tensors of one validated .safetensors file. Every read checks that the
    file is still the one whose header was parsed (offsets of another file's layout would read
    other bytes)."""

    def __init__(self, path: str):
        self.path = path
        try:
            before = file_identity(os.stat(path))
        except OSError:
            before = None  # parse_header reports it
        self.entries, self.metadata, self.data_start = parse_header(path)
        self.identity = before
        try:
            now = os.stat(path)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read ({exc.strerror})")
        self.check_unchanged(now)

    def check_unchanged(self, st) -> None:
        """Raise CheckpointError when st (a stat of the file now) is not the parsed file's."""
        if self.identity is None or file_identity(st) != self.identity:
            raise CheckpointError(f"{self.path}: changed on disk while it was being read "
                                  f"(replaced or rewritten); run again once it is complete")

    def read(self, name: str):
        """Read one tensor into a fresh torch tensor (CPU, its stored dtype), one copy in memory."""
        import torch

        e = self.entries[name]
        nbytes = e.end - e.start
        out = torch.empty(e.shape, dtype=getattr(torch, DTYPES[e.dtype][1]))
        if nbytes == 0:
            return out
        flat = out.reshape(-1).view(torch.uint8).numpy()  # (nbytes,) aliasing `out`
        fh, st = open_regular(self.path)
        try:
            self.check_unchanged(st)
        except CheckpointError:
            fh.close()
            raise
        try:
            with fh:
                fh.seek(e.start)
                got = fh.readinto(memoryview(flat))
        except OSError as exc:
            raise CheckpointError(f"{self.path}: tensor {name!r}: read failed ({exc.strerror})")
        if got != nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r}: file ended early (truncated?)")
        return out

    def raw_bytes(self, name: str) -> bytes:
        """The exact stored bytes of a tensor (for bit-identical copies)."""
        e = self.entries[name]
        fh, st = open_regular(self.path)
        try:
            self.check_unchanged(st)
        except CheckpointError:
            fh.close()
            raise
        try:
            with fh:
                fh.seek(e.start)
                data = fh.read(e.end - e.start)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: tensor {name!r}: read failed ({exc.strerror})")
        if len(data) != e.end - e.start:
            raise CheckpointError(f"{self.path}: tensor {name!r}: file ended early (truncated?)")
        return data
