"""LAPACK's MRRR symmetric eigensolver (dsyevr) called with the GIL released.

A CPU scan computes one matrix per core in threads (run/threads.py). torch's linear algebra
releases the GIL, but scipy's LAPACK wrappers hold it for the whole call, so two workers that
both sit in `scipy.linalg.eigh` run one after the other (bench/NOTES.md). Here the same routine
of scipy's own LAPACK (the function pointer scipy publishes for Cython in
`scipy.linalg.cython_lapack`) is called through ctypes, which releases the GIL for the duration
of a foreign call. Where that pointer is not available, scipy.linalg.eigh runs instead: the same
routine, the same results, only serialised.

dsyevr reduces G to tridiagonal form once (the d^3 part), then computes just the eigenvalues
asked for by index (and, with vectors, back-transforms only those): the top-k eigenpairs of a
Gram matrix cost little more than its eigenvalues.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

_lock = threading.Lock()
_fn: list = []  # [ctypes function or None], resolved once


def _dsyevr():
    """The ctypes function for scipy's dsyevr, or None."""
    with _lock:
        if not _fn:
            _fn.append(_resolve())
        return _fn[0]


def _resolve():
    try:
        from scipy.linalg import cython_lapack

        cap = cython_lapack.__pyx_capi__["dsyevr"]
        get_name = ctypes.pythonapi.PyCapsule_GetName
        get_name.restype = ctypes.c_char_p
        get_name.argtypes = [ctypes.py_object]
        get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
        get_ptr.restype = ctypes.c_void_p
        get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
        name = get_name(cap)
        if b"int *" not in name:  # a build with other integer types: use scipy's wrapper
            return None
        ptr = get_ptr(cap, name)
    except (ImportError, KeyError, AttributeError, ValueError, TypeError):
        return None
    p = ctypes.c_void_p
    # jobz range uplo n a lda vl vu il iu abstol m w z ldz isuppz work lwork iwork liwork info
    return ctypes.CFUNCTYPE(None, *([p] * 21))(ptr)


def _int(v: int):
    return ctypes.byref(ctypes.c_int(v))


def syevr_top(g: np.ndarray, count: int, vectors: bool = True):
    """The `count` largest eigenvalues (ascending) and, with `vectors`, their eigenvectors
    (d, count) of the symmetric float64 matrix g (d, d), by LAPACK dsyevr. g is not modified.
    count = d gives the whole spectrum."""
    d = g.shape[0]
    count = max(1, min(count, d))
    fn = _dsyevr()
    if fn is None:
        import scipy.linalg as sl

        return sl.eigh(g, subset_by_index=[d - count, d - 1], driver="evr", check_finite=False,
                       eigvals_only=not vectors)
    a = np.array(g, dtype=np.float64, order="F", copy=True)  # (d, d) overwritten by LAPACK
    w = np.empty(d, dtype=np.float64)
    z = np.empty((d, count) if vectors else (1, 1), dtype=np.float64, order="F")
    isuppz = np.empty(2 * count, dtype=np.int32)
    m = ctypes.c_int(0)
    info = ctypes.c_int(0)
    jobz = ctypes.c_char(b"V" if vectors else b"N")
    whole = count == d
    rng = ctypes.c_char(b"A" if whole else b"I")
    uplo = ctypes.c_char(b"L")
    zero = ctypes.c_double(0.0)
    ldz = d if vectors else 1

    def call(work, lwork, iwork, liwork):
        fn(ctypes.byref(jobz), ctypes.byref(rng), ctypes.byref(uplo), _int(d),
           a.ctypes.data_as(ctypes.c_void_p), _int(d), ctypes.byref(zero), ctypes.byref(zero),
           _int(d - count + 1), _int(d), ctypes.byref(zero), ctypes.byref(m),
           w.ctypes.data_as(ctypes.c_void_p), z.ctypes.data_as(ctypes.c_void_p), _int(ldz),
           isuppz.ctypes.data_as(ctypes.c_void_p), work.ctypes.data_as(ctypes.c_void_p),
           _int(lwork), iwork.ctypes.data_as(ctypes.c_void_p), _int(liwork), ctypes.byref(info))

    qw = np.empty(1, dtype=np.float64)
    qi = np.empty(1, dtype=np.int32)
    call(qw, -1, qi, -1)  # workspace query
    if info.value != 0:
        raise np.linalg.LinAlgError(f"dsyevr workspace query failed (info {info.value})")
    lwork, liwork = int(qw[0]), int(qi[0])
    call(np.empty(lwork, dtype=np.float64), lwork, np.empty(liwork, dtype=np.int32), liwork)
    if info.value != 0 or m.value != count:
        raise np.linalg.LinAlgError(f"dsyevr failed (info {info.value}, {m.value} of {count} "
                                    f"eigenvalues)")
    vals = w[:count].copy()
    return (vals, z) if vectors else vals
