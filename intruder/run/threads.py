"""Thread counts for CPU scans: one matrix per core, one BLAS thread per matrix.

On a CPU the scan computes several matrices at once (stream.Pipeline's worker threads). The
eigensolvers at weight-matrix sizes scale poorly with threads while independent matrices scale
fully, so each worker's linear algebra runs single-threaded (bench/NOTES.md). OpenMP reads its
thread count when the library starts and per calling thread, so the command line sets the
environment before torch is imported (`set_thread_env`), and a running Pipeline also sizes the
pools it can reach (`OneThreadEach`). This module imports no torch at import time.
"""

from __future__ import annotations

import os

from .. import settings

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_workers(cpus: int) -> int:
    """Matrices computed at once on a CPU (INTRUDER_CPU_WORKERS, default one per core up to 4)."""
    env = settings.cpu_workers()
    if env is not None:
        return env
    return max(1, min(4, cpus))


def set_thread_env() -> None:
    """Before torch is imported (scan, compare, track): BLAS / OpenMP threads per worker =
    cores // workers, unless the user set them."""
    if any(k in os.environ for k in _ENV):
        return
    cpus = usable_cpus()
    per = str(max(1, cpus // cpu_workers(cpus)))
    for k in _ENV:
        os.environ[k] = per


class OneThreadEach:
    """While CPU workers run: torch's and the BLAS libraries' pools sized so that workers x
    threads = cores (restored afterwards)."""

    def __init__(self, workers: int, cpus: int):
        self.threads = max(1, cpus // max(1, workers))
        self.active = workers > 1 or cpus == 1
        self.saved = None
        self.limits = None

    def __enter__(self):
        if self.active:
            import torch

            self.saved = torch.get_num_threads()
            torch.set_num_threads(self.threads)
            try:
                from threadpoolctl import threadpool_limits

                self.limits = threadpool_limits(limits=self.threads)
            except ImportError:  # scipy's BLAS then keeps its own pool
                self.limits = None
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import torch

            torch.set_num_threads(self.saved)
        if self.limits is not None:
            self.limits.restore_original_limits()
        return False
