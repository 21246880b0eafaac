"""The scan pipeline: parallel readers -> device workers -> results in order.

- Readers (threads) read the stored bytes of the next pairs straight into page-locked host
  buffers (CUDA) with positioned reads, hash the base for the spectral cache and load cached
  base spectra. They run ahead of the devices within a host-memory budget, granted in pair
  order (so the pair the devices need next can never be starved by later ones).
- Workers (threads, one CUDA stream each, `per_device` per GPU) copy a pair to their device,
  run the finiteness / unchanged checks and the LoRA merge there, and call engine.analyse.
  Several workers per GPU overlap one matrix's host round-trips with another's kernels.
  On a CPU, one worker thread per core (up to 4), each with one BLAS thread; on one core the
  calling thread computes.
- Results come back in pair order; an error is raised when its pair's turn comes, so a scan
  fails on the same pair, with the same message, as a sequential one would.
- Fleets (`intruder compare BASE FT1 ... FTn`): an item may be a group of pairs that share one
  base tensor. The base is read once, copied to the device once and decomposed once (or taken
  from the cache); each fine-tune's tensor is measured against it in turn, and the readers read
  the next groups (every fine-tune's next matrices) while the devices compute.

Peak host memory is the budget plus what one pair needs, whatever the model's size (the
budget grows with the largest item, not with the number of items: host_budget).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeAlias

import torch

from .. import settings
from ..errors import CheckpointError, IntruderError
from ..io.adapter import merge_lora
from ..io.dequant import decode, decoded_nbytes, noise_rms
from ..io.safetensors_file import DTYPES, SafetensorsFile, open_regular, torch_dtype
from ..spectral.engine import analyse
from ..spectral.partial import Eig
from ..types import LayerPair, LayerResult, ScanConfig, TensorRef
from .cache import content_key  # noqa: F401  (the cache's key, also used from here)
from .load import base_finite, tuned_status
from .threads import OneThreadEach, cpu_workers, usable_cpus

# bytes of tensors read ahead of the devices (measured on the 7B pair, one H200: 256 MiB and
# 512 MiB kept the GPU fed; peak RSS 1.7 / 1.95 GiB, bench/RESULTS.md)
DEFAULT_HOST_BUDGET = 512 * 2 ** 20
# ... at least one item per worker and one more when items are large (a fleet's group: the base
# and every fine-tune's tensor of one matrix, 450 MB for a 7B MLP matrix and 4 fine-tunes),
# so that every worker has its next item and the readers read several at once; at most this
AUTO_HOST_BUDGET_MAX = 4096 * 2 ** 20
# a pair on its device: (status, w0, wt), the matrices None unless the status is "scanned"
Prepared: TypeAlias = "tuple[str, torch.Tensor | None, torch.Tensor | None]"


def host_budget(biggest: int = 0, workers: int = 1) -> int:
    """Host bytes the readers may hold ahead of the devices: INTRUDER_HOST_BUDGET_MB, else
    512 MiB or, for large items, (workers + 1) x the largest item's bytes, up to 4 GiB. Peak
    host memory then still depends on the largest matrix (times the fleet's size), not on
    the model."""
    env = settings.host_budget_mb()
    if env is not None:
        return max(1, int(env * 2 ** 20))
    return max(DEFAULT_HOST_BUDGET, min((workers + 1) * biggest, AUTO_HOST_BUDGET_MAX))


@dataclass
class Raw:
    """One pair as read from disk (host tensors in their stored dtype)."""

    index: int
    pair: LayerPair
    w0: torch.Tensor | None = None  # (m, n)
    wt: torch.Tensor | None = None  # (m, n) full tuned tensor
    parts: dict[TensorRef, torch.Tensor] = field(default_factory=dict)  # LoRA factors
    key: str | None = None  # base content key (spectral cache)
    cached: object = None  # cached base Eig (CPU) or None
    nbytes: int = 0
    read_s: float = 0.0
    more: list[Raw] = field(default_factory=list)  # the group's other pairs (same base)
    group: bool = False  # an item given as a group: its result is a tuple
    noise: float | None = None  # rounding rms quantized storage put into dW (storage_noise)


class _Budget:
    """Host bytes in flight, granted strictly in pair order; one pair always fits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.turn = 0
        self.cv = threading.Condition()

    def acquire(self, index: int, nbytes: int, stop: threading.Event) -> bool:
        with self.cv:
            while not stop.is_set() and not (
                    self.turn == index and (self.used == 0 or self.used + nbytes <= self.limit)):
                self.cv.wait(0.1)
            if stop.is_set():
                return False
            self.used += nbytes
            self.turn += 1
            self.cv.notify_all()
            return True

    def skip(self, index: int, stop: threading.Event) -> None:
        self.acquire(index, 0, stop)

    def release(self, nbytes: int) -> None:
        with self.cv:
            self.used -= nbytes
            self.cv.notify_all()


def _nbytes(ref: TensorRef) -> int:

    if ref.storage is not None:  # decoded to float32 (GGUF F16/BF16 stay 2 bytes: over-counted)

        return decoded_nbytes(ref)
    n = DTYPES.get(ref.dtype, (8,))[0]
    for s in ref.shape:
        n *= s
    return n


def pair_refs(pair: LayerPair) -> list[TensorRef]:
    """Every tensor a pair needs, base first."""
    refs = [pair.base]
    if pair.lora is not None:
        refs += [r for r in (pair.lora.a, pair.lora.b, pair.lora.magnitude) if r is not None]
    elif pair.tuned is not None and pair.tuned != pair.base:
        refs.append(pair.tuned)
    return refs


class Reader:
    """Reads tensors into fresh (optionally page-locked) host tensors; one per thread."""

    def __init__(self, pinned: bool, fallback: Callable):
        self.pinned = pinned
        self.fallback = fallback  # read(ref) for formats other than safetensors
        self.headers: dict[str, object] = {}
        self.lock = threading.Lock()

    def _header(self, path: str):

        with self.lock:
            sf = self.headers.get(path)
        if sf is None:
            sf = SafetensorsFile(path)
            with self.lock:
                self.headers[path] = sf
        return sf

    def read(self, ref: TensorRef) -> torch.Tensor:
        if not ref.path.endswith(".safetensors"):
            with self.lock:  # the caller's read() shares one handle cache
                t = self.fallback(ref)
            return t.pin_memory() if self.pinned and t.numel() else t
        if ref.storage is not None:  # quantized / scaled: decoded to float here (io/dequant.py)

            t = decode(ref, lambda r: self._stored(r, raw=True), self._stored)
            return t.pin_memory() if self.pinned and t.numel() else t
        return self._stored(ref, pinned=self.pinned)

    def _stored(self, ref: TensorRef, raw: bool = False, pinned: bool = False) -> torch.Tensor:
        """A tensor as stored (its dtype and shape), or its bytes as flat uint8 with raw."""

        sf = self._header(ref.path)
        e = sf.entries.get(ref.name)
        if e is None:
            raise CheckpointError(f"{ref.path}: tensor {ref.name!r} is not in the file")
        dt = torch.uint8 if raw else torch_dtype(e.dtype)
        if dt is None:
            raise CheckpointError(f"{ref.path}: tensor {ref.name!r}: dtype {e.dtype} has no torch "
                                  f"type in torch {torch.__version__}")
        out = torch.empty((e.end - e.start,) if raw else e.shape, dtype=dt,
                          pin_memory=pinned and e.end > e.start)
        nbytes = e.end - e.start
        if nbytes == 0:
            return out
        view = out.reshape(-1).view(torch.uint8).numpy().data  # (nbytes,) memoryview aliasing out
        fh, st = open_regular(ref.path)
        try:
            sf.check_unchanged(st)  # the offsets are those of the file whose header was parsed
        except CheckpointError:
            fh.close()
            raise
        try:
            with fh:
                fd = fh.fileno()
                done = 0
                while done < nbytes:
                    got = os.preadv(fd, [view[done:]], e.start + done)
                    if got <= 0:
                        break
                    done += got
        except OSError as exc:
            raise CheckpointError(f"{ref.path}: tensor {ref.name!r}: read failed ({exc.strerror})") from exc
        if done != nbytes:
            raise CheckpointError(f"{ref.path}: tensor {ref.name!r}: file ended early (truncated?)")
        return out


def group_bytes(group) -> int:
    """Host bytes of one item: the shared base once, every pair's tuned tensors."""
    return sum(_nbytes(r) for r in pair_refs(group[0])) + \
        sum(_nbytes(r) for p in group[1:] for r in pair_refs(p)[1:])


def _read_tuned(raw: Raw, reader: Reader) -> None:
    p = raw.pair
    if p.lora is not None:
        for ref in pair_refs(p)[1:]:
            raw.parts[ref] = reader.read(ref)
    elif p.tuned is not None and p.tuned != p.base:
        raw.wt = reader.read(p.tuned)


def read_pair(raw: Raw, reader: Reader, base_cache) -> Raw:
    """Fill raw with the pair's tensors (and those of the group's other pairs), the base's cache
    key and any cached base spectrum."""
    t0 = time.perf_counter()
    p = raw.pair
    before = base_cache.identity(p.base) if base_cache is not None else None  # see key_for
    raw.w0 = reader.read(p.base)
    _read_tuned(raw, reader)
    for sub in raw.more:
        _read_tuned(sub, reader)
    for r in (raw, *raw.more):
        if r.wt is not None:
            r.noise = storage_noise(r.pair, raw.w0, r.wt, reader.read)
    if base_cache is not None:
        raw.key = base_cache.key_for(p.base, raw.w0, before)
        raw.cached = base_cache.load(raw.key)
    raw.read_s = time.perf_counter() - t0
    return raw


def storage_noise(p: LayerPair, w0: torch.Tensor, wt: torch.Tensor, read: Callable) -> float | None:
    """The rms rounding error that quantized storage of either side (io/dequant.noise_rms) put
    into wt - w0 (independent roundings add in variance), or None when neither side is
    quantized. A LoRA merged onto a quantized base carries none: both sides share its rounding."""
    if p.base.storage is None and (p.tuned is None or p.tuned.storage is None):
        return None

    both = (noise_rms(p.base, w0, read), noise_rms(p.tuned, wt, read) if p.tuned is not None else None)
    parts = [x for x in both if x is not None]
    return sum(x * x for x in parts) ** 0.5 if parts else None


def prepare(raw: Raw, device: torch.device, allow_nonfinite: bool) -> Prepared:
    """On the device: the checks load_pair makes, and the LoRA merge. Returns (status, w0, wt)."""
    w0 = base_on(raw, device, allow_nonfinite)
    if w0 is None:
        return "nonfinite", None, None
    return tuned_on(raw, w0, device, allow_nonfinite)


def base_on(raw: Raw, device: torch.device, allow_nonfinite: bool) -> torch.Tensor | None:
    """The base on the device, None when it is not finite (and that is allowed)."""
    assert raw.w0 is not None, "read_pair reads the base"
    w0 = raw.w0.to(device, non_blocking=device.type == "cuda")
    return w0 if base_finite(raw.pair, w0, allow_nonfinite) else None


def tuned_on(raw: Raw, w0: torch.Tensor, device: torch.device, allow_nonfinite: bool) -> Prepared:
    """The tuned tensor on the device (LoRA merged onto w0) with its checks: (status, w0, wt)."""
    p = raw.pair
    nb = device.type == "cuda"
    if p.lora is not None:
        parts = {ref: t.to(device, non_blocking=nb) for ref, t in raw.parts.items()}
        wt = merge_lora(w0, p.lora, parts.__getitem__)
    elif p.tuned == p.base:
        return "unchanged", None, None
    else:
        assert raw.wt is not None, "read_pair reads a tuned tensor that is not the base"
        wt = raw.wt.to(device, non_blocking=nb)
    status = tuned_status(p, w0, wt, allow_nonfinite)
    return (status, w0, wt) if status == "scanned" else (status, None, None)


def compute(raw: Raw, device: torch.device, config: ScanConfig, base_cache,
            on_copied: Callable | None = None):
    """Checks, analysis and cache update of one pair on `device` (current stream): a
    LayerResult, or a tuple of them (one per pair) for a group."""

    p = raw.pair
    rows, cols = p.base.shape  # pairs are matrices (io/pairing.py)
    shape = (rows, cols)
    t0 = time.perf_counter()
    members = [raw, *raw.more]
    w0 = base_on(raw, device, config.allow_nonfinite)
    prepared = [tuned_on(m, w0, device, config.allow_nonfinite) if w0 is not None
                else ("nonfinite", None, None) for m in members]
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # host buffers are free after the copy
    if on_copied is not None:
        on_copied()
    spec = raw.cached
    scratch: dict | None = {} if raw.more else None  # base-only work shared by a fleet
    out = []
    for m, (status, _, wt) in zip(members, prepared):
        if status != "scanned":
            out.append(LayerResult(name=m.pair.name, shape=shape, dtype=p.base.dtype,
                                   status=status))
            continue
        assert w0 is not None and wt is not None  # both on the device when "scanned"
        t1 = time.perf_counter()
        found, spec = analyse(w0, wt, config, m.pair.name, base_spec=spec,
                              scratch=scratch, noise=m.noise)
        out.append(found.layer(m.pair.name, shape, p.base.dtype,
                               seconds=time.perf_counter() - (t0 if not out else t1)))
    if device.type == "cuda":  # results complete: the cache writer may read `spec` from any stream
        torch.cuda.current_stream(device).synchronize()
    if base_cache is not None and raw.key is not None and _grew(raw.cached, spec):
        base_cache.store(raw.key, spec, p.base)
    return tuple(out) if raw.group else out[0]


def _grew(cached, used) -> bool:
    """Store a base spectrum the cache lacks or one that holds more than the cached one."""

    if not isinstance(used, Eig):
        return False
    if cached is None:
        return True
    return (used.complete and not cached.complete) or used.r > cached.r


def _warm_linalg(device) -> None:
    """torch loads cuSOLVER/cuBLAS lazily and that first load is not thread-safe: do it here,
    in the calling thread, before worker threads call linalg concurrently."""
    a = torch.eye(4, dtype=torch.float64, device=device) * 2.0
    torch.linalg.qr(a)
    torch.linalg.eigh(a)
    torch.linalg.eigvalsh(a)
    torch.linalg.cholesky_ex(a)
    torch.cholesky_inverse(torch.linalg.cholesky(a))
    torch.linalg.svdvals(a)
    torch.linalg.svd(a, full_matrices=False)
    torch.cuda.synchronize(device)


class Pipeline:
    """Run every pair through readers and device workers; iterate results in pair order. An
    item may be a tuple of pairs sharing one base (a fleet): its result is a tuple."""

    def __init__(self, pairs: list, read: Callable, config: ScanConfig,
                 devices: list[torch.device], base_cache=None, readers: int | None = None,
                 per_device: int | None = None, budget: int | None = None,
                 threaded: bool | None = None, group_fn: Callable | None = None):
        self.pairs = pairs
        self.config = config
        self.devices = devices
        self.base_cache = base_cache
        # what a worker runs per item: compute (scan, compare) or the caller's (track)
        self.group_fn = group_fn or compute
        cuda = devices[0].type == "cuda"
        cpus = usable_cpus()
        self.cpu_workers = 1 if cuda else cpu_workers(cpus)
        # workers in threads: CUDA streams, or one matrix per core on a multi-core CPU
        self.threaded = (cuda or self.cpu_workers > 1) if threaded is None else threaded
        self.n_readers = max(1, readers or settings.readers() or (
            min(8, max(2, cpus // 2)) if cuda else 1))
        self.per_device = max(1, per_device or ((settings.streams() or 3) if cuda
                                                else self.cpu_workers))
        # host bytes of each item (the shared base once, every pair's tuned tensors)
        self.item_bytes = [group_bytes(it if isinstance(it, tuple) else (it,)) for it in pairs]
        if not budget:
            budget = host_budget(max(self.item_bytes, default=0),
                                 len(devices) * self.per_device if self.threaded else 1)
        self.budget = _Budget(budget)
        self.reader = Reader(pinned=cuda, fallback=read)
        self.stop = threading.Event()
        self.next_index = 0
        self.index_lock = threading.Lock()
        self.ready: queue.Queue[Raw] = queue.Queue()
        self.results: dict[int, object] = {}
        self.cv = threading.Condition()
        self.threads: list[threading.Thread] = []
        self.stash: dict[int, Raw] = {}
        self.pool_threads = 1  # BLAS / OpenMP threads per worker (set in __iter__)

    def _name(self, i: int) -> str:
        item = self.pairs[i]
        return (item[0] if isinstance(item, tuple) else item).name

    # -- readers -----------------------------------------------------------------------------
    def _take(self) -> int | None:
        with self.index_lock:
            if self.next_index >= len(self.pairs):
                return None
            i = self.next_index
            self.next_index += 1
            return i

    def _read_loop(self):
        while not self.stop.is_set():
            i = self._take()
            if i is None:
                return
            item = self.pairs[i]
            group = item if isinstance(item, tuple) else (item,)
            nbytes = self.item_bytes[i]
            if not self.budget.acquire(i, nbytes, self.stop):
                return
            raw = Raw(i, group[0], nbytes=nbytes, group=isinstance(item, tuple),
                      more=[Raw(i, q) for q in group[1:]])
            try:
                self.ready.put(read_pair(raw, self.reader, self.base_cache))
            except BaseException as exc:  # reported when this pair's turn comes
                self.budget.release(nbytes)
                self._finish(i, exc)

    # -- workers -----------------------------------------------------------------------------
    def _finish(self, i: int, value) -> None:
        with self.cv:
            self.results[i] = value
            self.cv.notify_all()

    def _work_loop(self, device: torch.device):
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # OpenMP's thread count is per calling thread: set it here (CUDA workers: 1, their CPU
        # work is small eigh / bookkeeping, where more threads only add fork-join overhead)
        torch.set_num_threads(self.pool_threads)
        while not self.stop.is_set():
            try:
                raw = self.ready.get(timeout=0.1)
            except queue.Empty:
                if self._all_taken_and_done():
                    return
                continue
            self._run_one(raw, device, stream)

    def _run_one(self, raw: Raw, device, stream) -> None:
        released: list[int] = []

        def on_copied():
            if not released:
                released.append(1)
                raw.w0 = raw.wt = None
                raw.parts = {}
                for sub in raw.more:
                    sub.wt, sub.parts = None, {}
                self.budget.release(raw.nbytes)

        try:
            if stream is not None:
                with torch.cuda.device(device), torch.cuda.stream(stream):
                    res = self.group_fn(raw, device, self.config, self.base_cache, on_copied)
            else:
                res = self.group_fn(raw, device, self.config, self.base_cache, on_copied)
        except BaseException as exc:
            res = exc
        finally:
            on_copied()
        self._finish(raw.index, res)

    def _all_taken_and_done(self) -> bool:
        with self.index_lock:
            taken = self.next_index >= len(self.pairs)
        return taken and self.ready.empty() and all(
            not t.is_alive() for t in self.threads if t.name.startswith("intruder-read"))

    # -- driver ------------------------------------------------------------------------------
    def __iter__(self):
        n = len(self.pairs)
        for j in range(min(self.n_readers, max(n, 1))):
            t = threading.Thread(target=self._read_loop, name=f"intruder-read-{j}", daemon=True)
            self.threads.append(t)
        threaded = self.threaded
        for t in self.threads:  # readers first: reading overlaps the CUDA libraries' loading
            t.start()
        try:
            for dev in self.devices:
                if dev.type == "cuda":
                    _warm_linalg(dev)
        except BaseException:
            self.stop.set()
            raise
        if threaded:
            for dev in self.devices:
                for j in range(self.per_device):
                    t = threading.Thread(target=self._work_loop, args=(dev,),
                                         name=f"intruder-{dev}-{j}", daemon=True)
                    self.threads.append(t)
        cpus = usable_cpus()
        if self.devices[0].type == "cpu":
            pools = OneThreadEach(self.per_device if threaded else 1, cpus)
        else:
            pools = OneThreadEach(cpus, cpus)  # one thread each
        self.pool_threads = pools.threads
        pools.__enter__()
        for t in self.threads:
            if t.ident is None:
                t.start()
        try:
            for i in range(n):
                if not threaded:
                    self._serve_until(i)
                with self.cv:
                    while i not in self.results:
                        self.cv.wait(0.1)
                        if i not in self.results and not any(t.is_alive() for t in self.threads):
                            raise IntruderError(f"scan stopped: every worker thread ended before "
                                                f"matrix {self._name(i)!r} was done (out of "
                                                f"memory?)")
                    res = self.results.pop(i)
                if isinstance(res, BaseException):
                    raise res
                yield res
        finally:
            self.stop.set()
            # let threads leave their torch calls before the interpreter may exit (a thread still
            # inside C++ while the runtime is torn down aborts the process)
            deadline = time.monotonic() + 10.0
            for t in self.threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))
            pools.__exit__(None, None, None)

    def _serve_until(self, i: int) -> None:
        """CPU: compute pairs in the calling thread, in order, until pair i is done."""
        while True:
            with self.cv:
                if i in self.results:
                    return
            raw = self.stash.pop(i, None)
            if raw is not None:
                self._run_one(raw, self.devices[0], None)
                continue
            try:
                raw = self.ready.get(timeout=0.1)
            except queue.Empty:
                readers = [t for t in self.threads if t.name.startswith("intruder-read")]
                if not any(t.is_alive() for t in readers) and self.ready.empty():
                    with self.cv:
                        if i in self.results:
                            return
                    raise IntruderError(f"scan stopped: every reader thread ended before matrix "
                                        f"{self._name(i)!r} was read (out of memory?)") from None
                continue
            self.stash[raw.index] = raw  # readers may finish out of order
