"""Certified upper bounds on how well a tuned vector can match a base vector left out of the kept
top-R, from spectral slices of the base Gram matrix (no complete decomposition).

Algorithm 1 needs max_i |<t, b_i>| over every base singular vector b_i. The engine keeps the
base's top-R eigenpairs (X, Theta) of G = W0 W0^T or W0^T W0 (certified: every other eigenvalue
is <= rest, each kept vector within angle err_j of an exact one). For an intruder, t is a new
direction spread thinly over the thousands of left-out base vectors: each |<t, b_i>| is small,
but their squares sum to nearly 1, so the orthonormality bound of certify.py cannot prove it.

Slices can. The left-out eigenvalues of a weight matrix crowd towards the bottom of the
spectrum (power-law spectra: most of them within a factor of a few of the smallest), where a
polynomial in G cannot separate them; in mu = 1 / lambda they spread out. So the filters act on
H = G^-1 (Cholesky, then its inverse; H G - I is measured): with H's spectrum fenced in
[lo, hi] (a Cholesky factorization of hi I - H) and mapped to [-1, 1], and p_S a polynomial of
degree n that is >= floor_S > 0 on a slice S, every exact left-out eigenvector b of G with
1 / lambda in S satisfies

    |<z', b>| <= ( ||p_S(H) z'|| + ||z'|| rho max|p_S'| ) / floor_S

where z' is the tuned vector with its part in the kept span removed (that part meets b at most
||X^T b|| <= eta = sqrt(sum_j err_j^2)) and rho >= ||H - G^-1|| bounds how far b is from an
eigenvector of the stored H. ||p_S(H) z'||^2 is the energy of z' in S, blurred by the filter:
about n_S / d for a direction spread over the base, small. One set of Chebyshev vectors
T_i(H) z' (i <= n; n products with the (d, k) tuned block) serves every slice.

The tuned vectors may live on the other side of W0 than G (tall W0, left vectors): then
z = W0^T t (or W0 t) and <t, u_i> = <z, b_i> sqrt(mu_i): the slice's largest mu weighs it.

Every rounding term (Gram, inverse, the Chebyshev recurrence, the slice combination) is added as
a worst-case bound; the filters' floors are checked on a grid with Bernstein's inequality. The
result is an upper bound for each tuned vector; the engine reports it as such (a flag per
vector) and uses it only where it decides every epsilon exactly. Tests hold the bounds to the
float64 LAPACK reference (tests/test_slices.py).
"""


from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .partial import U64, Eig, gram, gram_error
from .sketch import norm_lanczos, top_eigenvalue

DEGREE = 96  # Chebyshev degree of the slice filters (n block products with the tuned block)
SLICES = 48  # slices of [0, pi] in theta = arccos(x): equal Chebyshev resolution
MARGIN = 2.5  # each filter's target reaches this many kernel widths (pi / n) past its slice
GRID = 1024  # grid points per slice for the floor check
MIN_FLOOR = 0.25  # a filter weaker than this on its slice is not used (none is, by design)


@dataclass(frozen=True)
class Bank:
    """Jackson-damped Chebyshev filters, one per theta-slice of [-1, 1]."""

    degree: int
    coef: torch.Tensor  # (n+1, S) float64 CPU: p_S = sum_i coef[i, S] T_i
    x_lo: np.ndarray  # (S,) slice S covers x in [x_lo, x_hi]
    x_hi: np.ndarray  # (S,)
    floor: np.ndarray  # (S,) certified min of p_S over its slice
    l1: np.ndarray  # (S,) sum_i |coef[i, S]| >= max |p_S| on [-1, 1]


def _jackson(n: int) -> np.ndarray:
    """Jackson damping factors g_0..g_n (kernel polynomial method)."""
    i = np.arange(n + 1)
    q = math.pi / (n + 2)
    return ((n + 2 - i) * np.cos(i * q) + np.sin(i * q) / math.tan(q)) / (n + 2)


@functools.lru_cache(maxsize=4)
def bank(degree: int = DEGREE, slices: int = SLICES, margin: float = MARGIN) -> Bank:
    """The filter bank (the same for every matrix: computed once per process)."""
    n = degree
    edges = np.linspace(0.0, math.pi, slices + 1)  # theta edges; x = cos(theta) decreasing
    g = _jackson(n)
    i = np.arange(1, n + 1)
    coef = np.zeros((n + 1, slices))
    floors, l1 = np.zeros(slices), np.zeros(slices)
    width = margin * math.pi / n
    for s in range(slices):
        a = max(0.0, edges[s] - width)
        b = min(math.pi, edges[s + 1] + width)
        c = np.empty(n + 1)
        c[0] = (b - a) / math.pi  # Chebyshev coefficients of the indicator of theta in [a, b]
        c[1:] = 2.0 / math.pi * (np.sin(i * b) - np.sin(i * a)) / i
        coef[:, s] = g * c
        l1[s] = np.abs(coef[:, s]).sum()
        th = np.linspace(edges[s], edges[s + 1], GRID + 1)  # (G+1,)
        vals = np.cos(np.outer(th, np.arange(n + 1))) @ coef[:, s]
        h = (edges[s + 1] - edges[s]) / GRID
        # |d p(cos th) / d th| <= n * l1 (Bernstein): between grid points p drops at most this
        floors[s] = vals.min() - n * l1[s] * h / 2 - 1e-12 * l1[s]
    x_hi = np.cos(edges[:-1])
    x_lo = np.cos(edges[1:])
    return Bank(n, torch.from_numpy(coef), x_lo, x_hi, floors, l1)


def _chol_ok(m: torch.Tensor) -> bool:
    _, info = torch.linalg.cholesky_ex(m)
    return int(info) == 0


def _chol_slack(m: torch.Tensor) -> float:
    """What a successful Cholesky factorization of m leaves unproved (backward error bound)."""
    return 1.01 * (m.shape[0] + 1) * U64 * abs(float(torch.diagonal(m).sum()))


@dataclass(frozen=True)
class InverseGram:
    """H ~ G^-1 of one base with its proved facts (the part of the bound that depends on the base
    alone: a fleet of fine-tunes of one base computes it once per matrix)."""

    side: str  # which Gram of W0: left (W0 W0^T) or right (W0^T W0)
    h: torch.Tensor  # (d, d) float64, exactly symmetric
    lo: float  # the spectra of H and of the exact G^-1 lie in [lo, hi]
    hi: float
    rho: float  # >= ||H - G_exact^-1||: residual of every exact eigenvector of G in H
    g_f: float  # ||G||_F (rounding of W0^T t)


def inverse_gram(w0: torch.Tensor, side: str, g: torch.Tensor | None = None
                 ) -> InverseGram | None:
    """H = G^-1 by Cholesky, ||H G - I|| measured and H's spectrum fenced (Lanczos estimate of
    ||H||, proved by a Cholesky of hi I - H). None for a (nearly) singular base. g: gram(w0,
    side) when the caller has it (not modified)."""
    d = min(w0.shape)
    dev = w0.device
    if g is None:
        g = gram(w0, side)  # (d, d) float64
    eps_g = gram_error(w0, g)
    chol, info = torch.linalg.cholesky_ex(g)  # (d, d) lower
    if int(info) != 0:  # (nearly) singular base: the complete decomposition handles it
        return None
    h = torch.cholesky_inverse(chol)  # (d, d) ~ G^-1
    del chol
    h = (h + h.mT) * 0.5  # exactly symmetric: the matrix every statement below is about
    res = h @ g  # (d, d) H G
    res.diagonal().sub_(1.0)  # H G - I
    g_f = float(torch.linalg.matrix_norm(g))
    h_f = float(torch.linalg.matrix_norm(h))
    e_r = 1.01 * float(torch.linalg.matrix_norm(res)) + 1.01 * (d + 2) * U64 * h_f * g_f
    del res, g
    apply_h = functools.partial(torch.matmul, h)  # y (d, b) -> H y
    # an estimate of ||H|| = lambda_max(H) (H is PSD), proved below: on the device first (one
    # host round trip), by the Lanczos that checks each step where that one broke down
    est = top_eigenvalue(apply_h, d, h.dtype, dev, block=4, steps=24, seed=7)
    if est is None or not est > 0:
        est = norm_lanczos(apply_h, apply_h, d, h.dtype, dev, block=4, iters=12, rtol=1e-4,
                           seed=7)
    del apply_h
    hi = None
    for grow in (1.01, 1.2, 2.0):
        m = -h
        m.diagonal().add_(est * grow)
        ok = _chol_ok(m)
        if ok:
            hi = est * grow + _chol_slack(m)
        del m
        if ok:
            break
    if hi is None:
        return None
    # ||H G_ex - I|| <= delta (G_ex: the exact Gram; ||G - G_ex|| <= eps_g), hence for the exact
    # inverse ||H - G_ex^-1|| <= delta / lambda_min(G_ex) <= delta hi / (1 - delta)
    delta = e_r + hi * eps_g
    if not delta < 0.5:
        return None
    rho = delta * hi / (1.0 - delta)
    return InverseGram(side, h, -rho, hi + rho, rho, g_f)


def leftout_bound(w0: torch.Tensor, e: Eig, t_vecs: torch.Tensor, t_err: torch.Tensor | None,
                  side: str, degree: int = DEGREE, slices: int = SLICES,
                  inv: InverseGram | None = None) -> torch.Tensor | None:
    """(k,) CPU float64: for each tuned vector t_j (a column of t_vecs, the `side` singular
    vectors of the tuned matrix), an upper bound on |<t_j, b>| over every base singular vector
    b of that side that is NOT among e's kept ones. None when a fence cannot be proved (the
    caller then decomposes the base completely).

    w0 (m, n) float64 on the device; e: certified top-R base eigenpairs (not complete);
    t_err (k,): angle bounds of the tuned vectors; inv: inverse_gram(w0, e.side) when the
    caller has it already."""
    rest = float(e.rest)
    d = min(w0.shape)
    if e.complete or e.r >= d or not rest > 0:
        return None
    dev = w0.device
    k = t_vecs.shape[1]
    fb = bank(degree, slices)
    n = fb.degree
    if inv is None or inv.side != e.side or inv.h.shape[0] != d:
        inv = inverse_gram(w0, e.side)
        if inv is None:
            return None
    h, lo, hi, rho, g_f = inv.h, inv.lo, inv.hi, inv.rho, inv.g_f
    eta = float(e.err.double().square().sum().sqrt()) * (1 + 1e-12) + 1e-15
    x = e.vecs  # (d, R)
    t = t_vecs.to(dev, torch.float64)  # (d_t, k)
    other = side != e.side
    if other:
        # <t, u_i> = <z, b_i> sqrt(mu_i), z = W0^T t (left t, right Gram) or W0 t
        z = (w0.mT @ t) if side == "left" else (w0 @ t)  # (d, k)
        dz = 1.01 * max(w0.shape) * U64 * math.sqrt(g_f * d) * \
            torch.linalg.vector_norm(t, dim=0).cpu()  # (k,) rounding of the product
    else:
        z = t
        dz = torch.zeros(k, dtype=torch.float64)
    xz = x.mT @ z  # (R, k)
    zp = z - x @ xz  # (d, k): the part outside the kept span
    xz_n = torch.linalg.vector_norm(xz, dim=0).cpu() * (1 + 1e-10)  # (k,)
    zp_n = torch.linalg.vector_norm(zp, dim=0).cpu()  # (k,)
    z_n = torch.linalg.vector_norm(z, dim=0).cpu()  # (k,)
    # rounding of z' = z - X X^T z: what the computed z' misses of the exact difference
    dz = dz + (e.r + 4) * U64 * (z_n + 2.0 * xz_n)
    # Chebyshev vectors T_i(Ht) z', Ht = a H - c I with spectrum in [-1, 1]
    a = 2.0 / (hi - lo)
    c = (hi + lo) / (hi - lo)
    # Ht formed once, so each step is one GEMM (on a GPU a step was two kernels and two host
    # dispatches). Forming it errs by at most 2u |Ht| + u c I entrywise (c ~ 1): inside the
    # slack of `gamma` below, which charges (d + 4) u and || |Ht| || + 2 per product
    ht = h * a  # (d, d)
    ht.diagonal().sub_(c)
    ys = torch.empty(n + 1, d, k, dtype=torch.float64, device=dev)  # (n+1, d, k)
    yv = ys.unbind(0)  # n + 1 views (d, k), made at once rather than indexed per step
    yv[0].copy_(zp)
    torch.mm(ht, zp, out=yv[1])
    for i in range(1, n):  # T_{i+1} = 2 Ht T_i - T_{i-1}
        torch.addmm(yv[i - 1], ht, yv[i], beta=-1.0, alpha=2.0, out=yv[i + 1])
    del yv, ht
    # slices that can hold a left-out eigenvalue: mu = 1 / lambda in [1 / rest, hi]
    x_min = a / rest - c
    active = np.nonzero(fb.x_hi >= x_min)[0]
    if active.size == 0:
        return torch.zeros(k, dtype=torch.float64)
    if float(fb.floor[active].min()) < MIN_FLOOR:
        return None
    coef = fb.coef[:, active].to(dev)  # (n+1, S')
    ps = (coef.mT @ ys.reshape(n + 1, d * k)).reshape(-1, d, k)  # (S', d, k) p_S(Ht) z'
    pn = torch.linalg.vector_norm(ps, dim=1).cpu()  # (S', k)
    del ys, ps
    l1 = torch.from_numpy(fb.l1[active])  # (S',)
    floor = torch.from_numpy(fb.floor[active])  # (S',)
    # rounding of the recurrence: ||computed T_i z' - T_i z'|| <= 3 gamma i^2 ||z'||, gamma
    # bounding one product with Ht (entrywise error gamma_d |Ht| |y|, || |Ht| || <= sqrt(d) + 1)
    gamma = 1.01 * (d + 4) * U64 * (math.sqrt(d) + 3.0)
    c_rec = 3.0 * gamma * n * n
    comb = (n + 2) * U64 * (1.0 + c_rec)  # rounding of sum_i coef_i y_i, relative
    slack = l1[:, None] * (c_rec + comb) * zp_n[None, :]  # (S', k)
    # an exact eigenvector of G is one of Ht up to a * rho; |p'| <= n^2 l1 (Markov)
    drift = a * rho * n * n * l1[:, None] * zp_n[None, :]  # (S', k)
    inner = (pn + slack + drift) / floor[:, None]  # (S', k) >= |<z', b>|, mu(b) in the slice
    inner = inner + eta * xz_n[None, :] + dz[None, :]  # >= |<z, b>|
    if other:
        mu_top = ((torch.from_numpy(fb.x_hi[active]) + c) / a).clamp(min=0.0, max=hi)  # (S',)
        inner = inner * mu_top.sqrt()[:, None]
    te = t_err[:k].double().cpu() if t_err is not None else torch.zeros(k, dtype=torch.float64)
    return inner.max(dim=0).values + 1.5 * te + 1e-12  # (k,)
