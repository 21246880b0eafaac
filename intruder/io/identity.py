"""Content identity of input files: the sha256 of every file a checkpoint is read from.

Digests are streamed in 8 MiB blocks on background threads (`prefetch`; one file per thread, up
to `n_workers()`), so hashing overlaps the scan's own reads of the same files (hashlib releases
the GIL on large blocks), and they are
remembered twice: in this process, and on disk under `<user cache dir>/sha256/`, keyed by the
file's real path, size, mtime, ctime, inode and device, so a re-scan of unchanged files hashes
nothing. A file that changes while it is hashed is hashed again and its digest is not cached;
nor is that of a file modified in the last 2 s (timestamps can be that coarse).

A checkpoint's content hash is the sha256 of its files' hex digests, sorted, one per line:
`sha256sum FILES | cut -c1-64 | sort | sha256sum` in a shell. Names do not enter it, so the same
bytes give the same hash under any file names, and two checkpoints with different bytes never
share one.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Iterable, Sequence

from .. import settings
from ..errors import CheckpointError
from .atomic import atomic_file

BLOCK = 8 << 20  # bytes read per hashlib update
RACY_NS = 2_000_000_000  # a file modified this recently is hashed but not cached
_Key = tuple[str, int, int, int, int, int]


def cache_dir() -> str:
    """Where digests are remembered: $INTRUDER_CACHE_DIR, else $XDG_CACHE_HOME/intruder, else
    ~/.cache/intruder (the base spectral cache's root), subfolder sha256/."""
    return os.path.join(settings.cache_dir(), "sha256")


def _key(path: str) -> _Key:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
    return (real, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _entry_path(key: _Key) -> str:
    name = hashlib.sha256("\0".join(map(str, key)).encode("utf-8", "surrogateescape")).hexdigest()
    return os.path.join(cache_dir(), name[:2], name[2:34])


def _cached(key: _Key) -> str | None:
    try:
        with open(_entry_path(key), encoding="ascii") as fh:
            text = fh.read(200).split()
    except (OSError, UnicodeDecodeError):
        return None
    # the entry repeats its key's path so that a hash collision of keys cannot mislead
    if len(text) == 2 and len(text[0]) == 64 and text[1] == hashlib.sha256(
            key[0].encode("utf-8", "surrogateescape")).hexdigest()[:16]:
        try:
            int(text[0], 16)
        except ValueError:
            return None
        return text[0]
    return None


def _store(key: _Key, digest: str) -> None:
    path = _entry_path(key)
    tag = hashlib.sha256(key[0].encode("utf-8", "surrogateescape")).hexdigest()[:16]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path, "w", durable=False) as fh:
            fh.write(f"{digest} {tag}\n")
    except Exception:  # an unwritable cache costs a re-hash next time, nothing else
        pass


def _hash_file(path: str, key: _Key) -> str:
    """Stream the file through sha256; re-hash once if it changed meanwhile."""
    for _ in range(2):
        h = hashlib.sha256()
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        try:
            with open(key[0], "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(buf)
                    if not n:
                        break
                    h.update(view[:n])
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read for its sha256 ({exc.strerror})") from exc
        after = _key(path)
        if after == key:
            # as git's index: a file changed within RACY_NS of now could change again without
            # a new timestamp (coarse clocks), so its digest is not remembered on disk
            if time.time_ns() - max(key[2], key[3]) >= RACY_NS:
                _store(key, h.hexdigest())
            return h.hexdigest()
        key = after
    return h.hexdigest()  # still changing: the digest of what was read, not cached


class _Job:
    def __init__(self, path: str, key: _Key):
        self.path, self.key = path, key
        self.done = threading.Event()
        self.digest: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.digest = _cached(self.key) or _hash_file(self.path, self.key)
        except BaseException as exc:  # handed to whoever waits for the digest
            self.error = exc
        finally:
            self.done.set()


_lock = threading.Lock()
_jobs: dict[_Key, _Job] = {}
_queue: queue.Queue[_Job] = queue.Queue()
_workers: list[threading.Thread] = []


def n_workers() -> int:
    """Files hashed at once: $INTRUDER_HASH_WORKERS, else half the cores, 1 to 4 (one core
    streams sha256 at roughly 0.6-2 GB/s; shards of one model hash in parallel)."""
    env = settings.hash_workers()
    if env is not None:
        return env
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def _work() -> None:
    while True:
        _queue.get().run()


def _job(path: str, background: bool) -> _Job:
    key = _key(path)
    with _lock:
        job = _jobs.get(key)
        if job is not None:
            return job
        job = _jobs[key] = _Job(path, key)
        if background:
            if len(_workers) < n_workers():
                # daemons: an interrupted scan does not wait for a hash to finish
                t = threading.Thread(target=_work, name="intruder-sha256", daemon=True)
                t.start()
                _workers.append(t)
            _queue.put(job)
            return job
    job.run()
    return job


def prefetch(paths: Iterable[str]) -> None:
    """Start hashing `paths` in the background (cached digests cost one small read)."""
    for p in paths:
        try:
            _job(p, background=True)
        except CheckpointError:
            pass  # reported when the digest is asked for


def sha256_file(path: str) -> str:
    """Hex sha256 of the file at `path` (memoised in the process and in the user cache)."""
    job = _job(path, background=False)
    job.done.wait()
    if job.error is not None:
        if isinstance(job.error, CheckpointError):
            raise job.error
        raise CheckpointError(f"{path}: cannot hash ({job.error})")
    assert job.digest is not None
    return job.digest


def content_hash(digests: Sequence[str]) -> str:
    """sha256 of the sorted hex digests, one per line (see the module docstring)."""
    return hashlib.sha256("".join(d + "\n" for d in sorted(digests)).encode()).hexdigest()


def file_identities(files: Sequence[str], root: str) -> list[dict]:
    """[{name, bytes, sha256}] per file; names relative to the checkpoint's directory."""
    prefetch(files)
    base = root if os.path.isdir(root) else os.path.dirname(root)
    out = []
    for f in files:
        rel = os.path.relpath(f, base) if base else os.path.basename(f)
        digest = sha256_file(f)
        _check_blob(f, digest)
        out.append({"name": rel, "bytes": os.path.getsize(f), "sha256": digest})
    return out


def _check_blob(path: str, digest: str) -> None:
    """A hub cache names large (LFS) blobs by their sha256: a blob whose bytes disagree was
    corrupted or altered after download, and must not be reported as that commit's file."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if os.path.basename(os.path.dirname(real)) == "blobs" and len(name) == 64 and \
            all(c in "0123456789abcdef" for c in name) and name != digest:
        raise CheckpointError(f"{path}: the hub cache blob {name[:16]}... holds other bytes "
                              f"(sha256 {digest[:16]}...): corrupted or altered after download; "
                              f"delete it and download again")


def recorded_mismatch(ck, info) -> str | None:
    """Why checkpoint `ck` is not the one a report recorded as `info` (None: it is). Reports
    from schema 1.2 on record the content sha256; older ones a hash of names and sizes."""
    if getattr(info, "sha256", None):
        now = ck.info().sha256
        return None if now == info.sha256 else \
            f"content sha256 {now[:16]} now, {info.sha256[:16]} in the report"
    if info.fingerprint and ck.header_fingerprint() != info.fingerprint:
        return f"fingerprint {ck.header_fingerprint()} now, {info.fingerprint} in the report"
    return None
