"""A careful, lazy reader of one .safetensors file.

The header is parsed and validated by us (not trusted): 8-byte little-endian length, a JSON object
of {name: {dtype, shape, data_offsets}}, offsets contiguous, non-overlapping, inside the file and
consistent with shape x dtype size. Tensors are read one at a time with a positioned read, so
memory holds only the tensor asked for.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from ..errors import CheckpointError

# safetensors dtype -> (bytes per element, torch dtype name): every whole-byte dtype the format
# defines (safetensors 0.8). A torch without one of these types (float8 before 2.1, uint16/32/64
# before 2.3, float8_e8m0fnu before 2.7) still parses the file; io/dequant.py decodes the 8-bit
# floats from their bytes, and the others are skipped by the scan with a note.
DTYPES: Mapping[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "C64": (8, "complex64"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U64": (8, "uint64"),
    "U32": (4, "uint32"),
    "U16": (2, "uint16"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
# sub-byte dtypes, packed (bits per element): parsed and listed, their bytes readable, never
# scanned (the format fixes neither the packing order nor where the block scales live)
PACKED_BITS: Mapping[str, int] = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def torch_dtype(dtype: str):
    """The torch dtype of a safetensors dtype string, or None where this torch lacks it."""
    import torch

    info = DTYPES.get(dtype)
    return getattr(torch, info[1], None) if info is not None else None


def storage_nbytes(dtype: str, shape) -> int | None:
    """Bytes a tensor of this dtype and shape occupies; None for a packed size that is not whole."""
    numel = 1
    for d in shape:
        numel *= d
    if dtype in DTYPES:
        return numel * DTYPES[dtype][0]
    bits = numel * PACKED_BITS[dtype]
    return bits // 8 if bits % 8 == 0 else None


MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
MAX_DIM = 2 ** 63 - 1  # torch's sizes and strides are int64, even in an empty tensor


class DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object_pairs_hook: the object as a dict; DuplicateKeyError names a repeated key."""
    out = dict(pairs)  # C speed; a header can hold a million objects
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKeyError(k)
            seen.add(k)
    return out


def strict_json(text: str):
    """json.loads that refuses duplicate keys (json would keep the last one silently).

    Raises ValueError (DuplicateKeyError for a repeated key; also a number too long to convert)
    or RecursionError (nesting bomb)."""
    return json.loads(text, object_pairs_hook=no_duplicate_keys)


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def check_regular_file(path: str, what: str = "checkpoint") -> os.stat_result:
    """Refuse anything but a regular, readable file (no FIFOs, devices, sockets)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot stat ({exc.strerror})") from exc
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
        raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file ({_kind(st.st_mode)}); refusing to "
                              f"read it as a {what}")
    return os.fdopen(fd, "rb"), st


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside the block. Parsing a header (or pairing its names)
    allocates millions of small acyclic objects; each collection would walk all of them, which
    doubles the time of a million-tensor header. Restores the previous state."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and validate the header; return (entries, metadata, data start offset)."""
    with gc_paused():
        return _parse_header(path)


def _parse_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    fh, st = open_regular(path)
    size = st.st_size
    try:
        with fh:
            if size < 8:
                raise CheckpointError(f"{path}: file is empty" if size == 0 else
                                      f"{path}: file too short for a safetensors header "
                                      f"({size} bytes)")
            (n,) = struct.unpack("<Q", fh.read(8))
            # the length is never printed: for a file that is not a checkpoint at all it is
            # eight bytes of someone's text (a password file's first line, say)
            if n > MAX_HEADER:
                raise CheckpointError(f"{path}: header length (first 8 bytes) exceeds the 100 MB "
                                      f"limit; not a safetensors file?")
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length (first 8 bytes) is larger than the file ({size} "
                    f"bytes); truncated, or not a safetensors file?")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        header = strict_json(raw.decode("utf-8"))
    except DuplicateKeyError as exc:
        raise CheckpointError(f"{path}: header names {exc.key!r} twice; a duplicated entry "
                              f"would hide one of the two tensors") from exc
    except (ValueError, RecursionError):  # bad UTF-8 / JSON, or a number too long to convert
        raise CheckpointError(f"{path}: header is not valid JSON; not a safetensors file?") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    if not all(_valid_unicode(k) and _valid_unicode(v) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: __metadata__ holds a string that is not valid Unicode")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if not _valid_unicode(name):  # a lone surrogate escape; serde_json (safetensors) refuses it
            raise CheckpointError(f"{path}: tensor name {name!r} is not valid Unicode")
        entries[name] = _entry(path, name, info, data_start, data_len)
    _check_layout(path, entries, data_len, data_start)
    return entries, metadata, data_start


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _entry(path: str, name: str, info, data_start: int, data_len: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry is not an object")
    dtype = info.get("dtype")
    shape = info.get("shape")
    offs = info.get("data_offsets")
    if type(dtype) is not str or (dtype not in DTYPES and dtype not in PACKED_BITS):
        raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r} (not a "
                              f"safetensors dtype)")
    # JSON gives exactly int for integers (bool is a subclass, hence `type(..) is int`)
    numel = 1
    dims: tuple[int, ...] = ()
    if type(shape) is not list or len(shape) > 8:
        numel = -1
    else:
        for d in shape:
            if type(d) is not int or not 0 <= d <= MAX_DIM:
                numel = -1
                break
            numel *= d
        dims = tuple(shape)
    if numel == 0:  # empty, yet torch's strides (products of trailing dimensions) must fit int64
        nonzero = 1
        for d in dims:
            nonzero *= d or 1
        if nonzero > MAX_DIM:
            numel = -1
    if numel < 0:
        raise CheckpointError(f"{path}: tensor {name!r}: invalid shape {shape!r}")
    if type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int \
            or type(offs[1]) is not int:
        raise CheckpointError(f"{path}: tensor {name!r}: invalid data_offsets {offs!r}")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets {offs} outside the data section "
            f"({data_len} bytes); truncated file?")
    size = DTYPES.get(dtype)
    need = numel * size[0] if size is not None else storage_nbytes(dtype, shape)
    if need is None:
        raise CheckpointError(f"{path}: tensor {name!r}: shape {shape} of packed {dtype} is not a "
                              f"whole number of bytes")
    if need != end - begin:
        raise CheckpointError(
            f"{path}: tensor {name!r}: shape {shape} x {dtype} needs {need} "
            f"bytes but data_offsets span {end - begin}")
    return TensorEntry(name, dtype, dims, data_start + begin, data_start + end)


def _check_layout(path: str, entries: dict[str, TensorEntry], data_len: int, data_start: int):
    """The data section is the tensors, back to back, and nothing else (as the safetensors library
    requires): no two tensors overlap (a duplicated region would alias two weights), no gap
    between them and no bytes after the last one (room for content no reader looks at)."""
    spans = sorted((e.start, e.end, e.name) for e in entries.values())  # O(n log n)
    nonempty = [s for s in spans if s[1] > s[0]]
    for (_s0, e0, n0), (s1, _e1, n1) in zip(nonempty, nonempty[1:]):
        if s1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the file")
    pos, prev = data_start, None
    for start, end, name in spans:
        if start < pos:  # an empty tensor placed inside another one
            raise CheckpointError(f"{path}: tensor {name!r} starts inside tensor {prev!r}")
        if start > pos:
            where = f"after tensor {prev!r}" if prev is not None else "before the first tensor"
            raise CheckpointError(f"{path}: {start - pos} unused bytes {where} (tensor {name!r} "
                                  f"starts at data offset {start - data_start}); the data "
                                  f"section must hold the tensors back to back")
        pos, prev = end, name
    if pos != data_start + data_len:
        raise CheckpointError(f"{path}: {data_start + data_len - pos} bytes after the last tensor "
                              f"(the data section must end where the last tensor ends); "
                              f"corrupt, or something appended to the file")


def file_identity(st) -> tuple[int, int, int, int, int]:
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
            raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
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
        dt = torch_dtype(e.dtype)
        if dt is None:
            raise CheckpointError(f"{self.path}: tensor {name!r}: dtype {e.dtype} has no torch "
                                  f"type in torch {torch.__version__}")
        out = torch.empty(e.shape, dtype=dt)
        if nbytes == 0:
            return out
        flat = out.reshape(-1).view(torch.uint8).numpy()  # (nbytes,) aliasing `out`
        with self._at_tensor(name) as fh:
            got = fh.readinto(flat.data)  # memoryview of `flat`
        self._check_length(name, got, nbytes)
        return out

    def raw_bytes(self, name: str) -> bytes:
        """The exact stored bytes of a tensor (for bit-identical copies)."""
        e = self.entries[name]
        with self._at_tensor(name) as fh:
            data = fh.read(e.end - e.start)
        self._check_length(name, len(data), e.end - e.start)
        return data

    @contextlib.contextmanager
    def _at_tensor(self, name: str) -> Iterator[io.BufferedReader]:
        """The file, checked to be the parsed one and positioned at tensor `name`'s first byte;
        an OSError while reading in the block becomes a CheckpointError naming the tensor."""
        fh, st = open_regular(self.path)
        with fh:
            self.check_unchanged(st)
            try:
                fh.seek(self.entries[name].start)
                yield fh
            except OSError as exc:
                raise CheckpointError(f"{self.path}: tensor {name!r}: read failed "
                                      f"({exc.strerror})") from exc

    def _check_length(self, name: str, got: int | None, want: int) -> None:
        if got != want:
            raise CheckpointError(f"{self.path}: tensor {name!r}: file ended early (truncated?)")
