"""Base spectral cache: decompose a base model once, audit any number of its fine-tunes.

Key: sha256 of the base tensor's stored bytes + dtype + shape (its content, not its path: the
same base in two directories shares entries, and any change of a single weight is a miss).
Hashing 13 GB costs seconds, so a small index remembers, per file, the content key of each tensor
together with the file's identity (device, inode, size, mtime and ctime in ns). A file that is
rewritten, replaced or touched gets a new identity and is hashed again; ctime cannot be set back
by tools that preserve mtime. As in git's index, a file modified within 2 s of being hashed is
not remembered (timestamps can be that coarse). The identity is taken before the tensor is read
and again after (`identity`, `key_for`): a file replaced or changed while it was read (`cp -p`
and `mv`, `rsync -a`) gets the content key of the bytes actually read and nothing is
remembered, so the index never maps a file to bytes it did not hold. Only safetensors files,
which are opened by path for every tensor read, use the index; others are hashed.

Entries are safetensors files (no pickle): the certified top eigenpairs of the base's smaller Gram
matrix (or all of them) as the engine computed them, with a sha256 over their metadata and every
tensor's bytes stored as their last tensor; index files carry a sha256 of their content too.
Both are verified on every load: a damaged entry (a flipped bit in a vector that keeps its
norm, in a singular value, in the metadata) is a miss and the scan rewrites it. A later scan
that needs more of the base spectrum widens the entry. Writes are atomic (temporary file +
rename). The cache keeps itself under INTRUDER_CACHE_MAX_GB (default 20) by evicting the least
recently used.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import re
import threading
import time

import torch

from .. import settings
from ..errors import OutputError
from ..io.atomic import atomic_file
from ..io.writer import SafetensorsStreamWriter, TensorSpec, tensor_bytes
from ..spectral.partial import Eig
from ..types import TensorRef

FORMAT = "intruder-base-spectrum"
VERSION = "2"  # 2: checksums in entries and index files, the spectrum's scale
SPECTRA = f"spectra-v{VERSION}"
INDEX = f"files-v{VERSION}"
_OLD = re.compile(r"^(spectra|files)-v[0-9]+$")  # this cache's folders, any version
RACY_NS = 2_000_000_000
DEFAULT_MAX_GB = 20.0
CHECKSUM = "sha256"  # name of the entry's last tensor: U8 (32,)
TENSORS = ("vals", "vecs", "err", "other")  # an entry's tensors, in file order, before CHECKSUM


def default_cache_dir() -> str:
    """$INTRUDER_CACHE_DIR, else $XDG_CACHE_HOME/intruder, else ~/.cache/intruder."""
    return settings.cache_dir()


def content_key(t: torch.Tensor, ref: TensorRef) -> str:
    """sha256 of a tensor's stored bytes, dtype and shape: the base spectral cache's key."""
    h = hashlib.sha256(f"{ref.dtype}|{tuple(ref.shape)}|".encode())
    if t.numel():
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # no copy
    return h.hexdigest()


def _entry_hash(meta: dict[str, str]):
    """The running checksum of an entry: its metadata first (sorted JSON), then each tensor."""
    h = hashlib.sha256(b"intruder-base-spectrum\0")
    h.update(json.dumps(meta, sort_keys=True, ensure_ascii=True).encode())
    return h


def _tensor_head(h, name: str, shape) -> None:
    h.update(f"\0{name}|F64|{list(shape)}\0".encode())


def _doc_digest(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _write_atomic(path: str, fill) -> None:
    """Temporary sibling + rename (io.atomic): readers see the old file or the whole new one,
    never a part. fill(fh) writes the content. No fsync: a torn entry is a miss, not an error."""

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_file(path, "wb", durable=False) as fh:
        fill(fh)


WRITE_BLOCK = 16 * 2 ** 20  # bytes copied to the host at a time when writing an entry


def _stream_entry(fh, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """One safetensors file, written to fh, from float64 tensors on any device, copied to the
    host in row blocks of at most WRITE_BLOCK bytes; the checksum of the metadata and of every
    block written goes last (tensor CHECKSUM)."""

    names = [n for n in TENSORS if n in tensors]
    specs = [TensorSpec(name, "F64", tuple(tensors[name].shape)) for name in names]
    specs.append(TensorSpec(CHECKSUM, "U8", (32,)))
    w = SafetensorsStreamWriter(fh, specs, metadata=meta, where=getattr(fh, "name", ""))
    h = _entry_hash(meta)

    def hashed(blocks):
        for blk in blocks:
            h.update(blk)
            yield blk

    for name in names:
        t = tensors[name].to(torch.float64)  # (rows, cols) or (r,)
        _tensor_head(h, name, t.shape)
        rows = max(1, WRITE_BLOCK // max(1, 8 * (t.shape[1] if t.dim() == 2 else 1)))
        w.write_blocks(name, hashed(tensor_bytes(t[i:i + rows]) for i in range(0, t.shape[0], rows))
                       if t.numel() else [])
    w.write_blocks(CHECKSUM, [h.digest()])
    w.close()


def _verify_entry(meta: dict[str, str], t: dict[str, torch.Tensor]) -> None:
    """Raise ValueError unless the entry's checksum matches its metadata and tensors."""

    extra = set(t) - set(TENSORS) - {CHECKSUM}
    if extra or CHECKSUM not in t:
        raise ValueError("unexpected tensors or no checksum")
    h = _entry_hash(meta)
    for name in TENSORS:
        if name in t:
            if t[name].dtype != torch.float64:
                raise ValueError(f"{name}: not float64")
            _tensor_head(h, name, t[name].shape)
            h.update(tensor_bytes(t[name]))
    stored = t[CHECKSUM]
    if stored.dtype != torch.uint8 or stored.numel() != 32 or \
            bytes(stored.numpy().tobytes()) != h.digest():
        raise ValueError("checksum mismatch")


def _is_temporary(name: str) -> bool:
    """A temporary sibling left by an interrupted write (io.atomic's, or this cache's older
    `.tmp-` ones)."""
    return name.startswith(".tmp-") or (name.startswith(".") and name.endswith(".tmp"))


def _identity(path: str):
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _power_of_two(x: float) -> bool:
    return math.isfinite(x) and x > 0 and math.frexp(x)[0] == 0.5


class BaseCache:
    """Content-keyed store of base spectra (intruder.spectral.partial.Eig) under `root`."""

    def __init__(self, root: str, max_bytes: int | None = None):
        self.root = os.path.abspath(os.path.expanduser(root))
        gb = settings.cache_max_gb()
        self.max_bytes = max_bytes or int((gb if gb is not None else DEFAULT_MAX_GB) * 2 ** 30)
        self.lock = threading.Lock()
        self.index: dict[str, dict] = {}  # real path -> {"identity": [...], "tensors": {...}}
        self.hits = self.misses = self.stores = 0
        # pending writes hold spectra (on their device until written): bounded, so a slow disk
        # slows the scan instead of growing its memory
        self._writes: queue.Queue = queue.Queue(maxsize=4)
        self._total: int | None = None  # bytes of entries, counted once, then kept up to date
        self._writer: threading.Thread | None = None
        self._errors: list[str] = []

    # -- content keys ------------------------------------------------------------------------
    def _index_path(self, real: str) -> str:
        return os.path.join(self.root, INDEX, hashlib.sha256(os.fsencode(real)).hexdigest()[:40] + ".json")

    def _file_index(self, path: str, ident: list | None = None) -> dict:
        """The index of file `path` as of identity `ident` (default: its identity now)."""
        real = os.path.realpath(path)
        with self.lock:
            doc = self.index.get(real)
        ident = _identity(real) if ident is None else ident
        if doc is None or doc.get("identity") != ident:
            doc = {"path": real, "identity": ident, "tensors": {}}
            try:
                with open(self._index_path(real), encoding="utf-8") as fh:
                    disk = json.load(fh)
                if isinstance(disk, dict) and disk.get("identity") == ident and \
                        disk.get("path") == real and isinstance(disk.get("tensors"), dict) and \
                        disk.get("sha256") == _doc_digest(disk):
                    doc = disk
            except (OSError, ValueError):
                pass
            with self.lock:
                self.index[real] = doc
        return doc

    @staticmethod
    def identity(ref: TensorRef) -> list | None:
        """Identity of ref's file now (take it before reading the tensor; pass it to key_for),
        or None when the index is not used for it (not safetensors, or unreadable)."""
        if not ref.path.endswith(".safetensors"):
            return None
        try:
            return _identity(os.path.realpath(ref.path))
        except OSError:
            return None

    def key_for(self, ref: TensorRef, tensor: torch.Tensor, before: list | None) -> str:
        """The content key of `tensor`, ref's tensor as just read, whose file had identity
        `before` (self.identity, taken before the read). The index is used and updated only
        when the file still has that identity: then the bytes read are the bytes indexed."""
        after = self.identity(ref)
        if before is None or after != before:
            return content_key(tensor, ref)  # changed while read, or not indexed: hash, keep none
        key = self.known_key(ref, before)
        if key is None:
            key = content_key(tensor, ref)
            self.remember_key(ref, key, before)
        return key

    def known_key(self, ref: TensorRef, ident: list | None = None) -> str | None:
        """The content key recorded for ref's tensor if its file has identity `ident` (default:
        its identity now) and had it when the key was recorded, else None."""
        try:
            doc = self._file_index(ref.path, ident)
        except OSError:
            return None
        rec = doc["tensors"].get(ref.name)
        if isinstance(rec, list) and len(rec) == 3 and rec[0] == ref.dtype and \
                rec[1] == list(ref.shape) and isinstance(rec[2], str):
            return rec[2]
        return None

    def remember_key(self, ref: TensorRef, key: str, ident: list | None = None) -> None:
        """Record `key` for ref's tensor under its file's identity `ident` (default: now)."""
        try:
            doc = self._file_index(ref.path, ident)
        except OSError:
            return
        if time.time_ns() - doc["identity"][3] < RACY_NS:
            return  # modified just now: the same mtime could hide a second change
        with self.lock:
            doc["tensors"][ref.name] = [ref.dtype, list(ref.shape), key]
            doc["sha256"] = _doc_digest(doc)
            data = json.dumps(doc).encode()
        try:
            _write_atomic(self._index_path(doc["path"]), lambda fh: fh.write(data))
        except OSError as exc:
            self._note(f"cannot write the cache index in {self.root} ({exc.strerror})")
        except OutputError as exc:
            self._note(f"cannot write the cache index in {self.root} ({exc})")

    # -- entries -----------------------------------------------------------------------------
    def _entry_path(self, key: str) -> str:
        return os.path.join(self.root, SPECTRA, key + ".safetensors")

    def load(self, key: str):
        """The cached base spectrum (CPU) for a content key, or None."""
        from safetensors import safe_open


        path = self._entry_path(key)
        if not os.path.exists(path):
            self.misses += 1
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("version") != VERSION or \
                        meta.get("key") != key:
                    raise ValueError("not an entry of this cache version")
                t = {name: f.get_tensor(name) for name in f.keys()}
            _verify_entry(meta, t)
            scale = float(meta["scale"])
            if not _power_of_two(scale):
                raise ValueError("scale is not a power of two")
            vals, vecs, err = t["vals"], t["vecs"], t["err"]
            r = vals.numel()
            if vecs.dim() != 2 or vecs.shape[1] != r or err.numel() != r or \
                    meta["side"] not in ("left", "right"):
                raise ValueError("inconsistent shapes")
            other = t.get("other")
            for name in ("vecs", "other"):  # unit columns, or the entry is damaged
                v = t.get(name)
                if v is not None and v.numel() and not bool(
                        ((torch.linalg.vector_norm(v.double(), dim=0) - 1.0).abs() < 1e-8).all()):
                    raise ValueError(f"{name}: columns are not unit vectors")
            e = Eig(vals.double(), vecs.double(), err.double(), float(meta["rest"]),
                    meta["complete"] == "1", meta["side"], meta["method"],
                    None if other is None else other.double(), scale)
            os.utime(path)  # least recently used eviction
        except Exception:  # a damaged entry is a miss; the scan rewrites it
            self.misses += 1
            return None
        self.hits += 1
        return e

    def store(self, key: str, eig, ref: TensorRef | None = None, wait: bool = False) -> None:
        """Write an entry (in a background thread; flush() waits for the writes).

        The spectrum stays where it is (a GPU's memory, say) until the writer streams it to disk
        in blocks: host memory never holds a whole complete base (512 MiB at 8192)."""
        meta = {"format": FORMAT, "version": VERSION, "key": key, "side": eig.side,
                "method": eig.method, "complete": "1" if eig.complete else "0",
                "rest": repr(float(eig.rest)), "scale": repr(float(eig.scale)),
                "created": str(int(time.time())),
                "tensor": ref.name if ref else "", "source": os.path.realpath(ref.path) if ref else "",
                "shape": json.dumps(list(ref.shape)) if ref else "", "dtype": ref.dtype if ref else ""}
        tensors = {"vals": eig.vals.contiguous(), "vecs": eig.vecs.contiguous(),
                   "err": eig.err.contiguous()}
        if eig.other is not None:
            tensors["other"] = eig.other.contiguous()
        for t in tensors.values():  # .contiguous() may have queued a copy on this thread's
            if t.device.type == "cuda":  # stream: the writer thread reads them on another
                torch.cuda.current_stream(t.device).synchronize()
                break
        if wait:
            self._write(key, tensors, meta)
            return
        with self.lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name="intruder-cache",
                                                daemon=True)
                self._writer.start()
        self._writes.put((key, tensors, meta))

    def _write_loop(self):
        while True:
            item = self._writes.get()
            try:
                self._write(*item)
            except Exception as exc:  # the writer must live on: producers wait on its queue
                self._note(f"cannot write the base spectral cache in {self.root} ({exc})")
            finally:
                self._writes.task_done()

    def _write(self, key, tensors, meta) -> None:
        path = self._entry_path(key)
        try:
            _write_atomic(path, lambda fh: _stream_entry(fh, tensors, meta))
            self.stores += 1
            size = os.path.getsize(path)
        except OSError as exc:
            self._note(f"cannot write the base spectral cache in {self.root} ({exc.strerror})")
            return
        except Exception as exc:  # safetensors reports some I/O failures in its own type
            self._note(f"cannot write the base spectral cache in {self.root} ({exc})")
            return
        if self._total is None:
            self._total = self.total_bytes()
        else:
            self._total += size
        if self._total > self.max_bytes:
            self.trim()
            self._total = self.total_bytes()

    def _note(self, msg: str) -> None:
        if msg not in self._errors:
            self._errors.append(msg)

    def flush(self) -> list[str]:
        """Wait for pending writes; return warnings about writes that failed."""
        if self._writer is not None:
            self._writes.join()
        return list(self._errors)

    # -- management --------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """One dict per entry: key, bytes, last used, and what it holds."""
        from safetensors import safe_open

        d = os.path.join(self.root, SPECTRA)
        out = []
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(d, name)
            try:
                st = os.stat(path)
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                    r = f.get_slice("vals").get_shape()[0]
                    dim = f.get_slice("vecs").get_shape()[0]
            except Exception:
                meta, r, dim = {}, None, None
                st = os.stat(path)
            out.append({"key": name[: -len(".safetensors")], "bytes": st.st_size,
                        "last_used": st.st_mtime, "tensor": meta.get("tensor", ""),
                        "source": meta.get("source", ""),
                        "shape": json.loads(meta["shape"]) if meta.get("shape") else None,
                        "dtype": meta.get("dtype", ""), "method": meta.get("method", "?"),
                        "complete": meta.get("complete") == "1", "kept": r, "gram_dim": dim})
        return out

    def total_bytes(self) -> int:
        d = os.path.join(self.root, SPECTRA)
        total = 0
        for name in os.listdir(d) if os.path.isdir(d) else []:
            try:
                total += os.path.getsize(os.path.join(d, name))
            except OSError:
                pass
        return total

    def trim(self) -> int:
        """Evict least recently used entries until the cache is under 90% of its limit."""
        d = os.path.join(self.root, SPECTRA)
        try:
            files = [(os.stat(os.path.join(d, f)), os.path.join(d, f)) for f in os.listdir(d)
                     if f.endswith(".safetensors")]
        except OSError:
            return 0
        total = sum(st.st_size for st, _ in files)
        if total <= self.max_bytes:
            return 0
        removed = 0
        for st, path in sorted(files, key=lambda x: x[0].st_mtime):
            if total <= 0.9 * self.max_bytes:
                break
            try:
                os.unlink(path)
                total -= st.st_size
                removed += 1
            except OSError:
                pass
        return removed

    def clear(self) -> tuple[int, int, list[str]]:
        """Remove every entry and index file of this cache (this version's and older ones');
        returns (files removed, their bytes, one line per file that could not be removed)."""
        n = size = 0
        failed: list[str] = []
        try:
            subs = sorted(s for s in os.listdir(self.root) if _OLD.match(s))
        except OSError:
            subs = []
        for sub in subs:
            d = os.path.join(self.root, sub)
            if os.path.islink(d) or not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                path = os.path.join(d, name)
                if os.path.isfile(path) and not os.path.islink(path) and (
                        name.endswith((".safetensors", ".json")) or _is_temporary(name)):
                    try:
                        nbytes = os.path.getsize(path)
                        os.unlink(path)
                    except OSError as exc:
                        failed.append(f"{path}: {exc.strerror}")
                        continue
                    size += nbytes
                    n += 1
            try:
                os.rmdir(d)
            except OSError:
                pass
        return n, size, failed
