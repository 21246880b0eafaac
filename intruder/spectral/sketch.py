"""Small-block linear algebra for the update measures: orthonormal bases, ||M||_2 by block
Lanczos and a randomized singular-value sketch, built from matrix products and eigh of small
(s, s) matrices on the CPU.

No Householder QR and no SVD runs on the device here: on a GPU both are sequences of many
small kernels with host round-trips (measured 49-110 ms per 4096-wide update for the previous
QR + svdvals sketch, bench/NOTES.md), while a product with an (m, s) block is one GEMM.
"""

from __future__ import annotations

from typing import Callable

import torch

_OMEGA: dict = {}  # (rows, cols, dtype, device, seed) -> a reusable Gaussian block


def seeded_randn(rows: int, cols: int, seed: int, device, dtype=torch.float64,
                 reuse: bool = False) -> torch.Tensor:
    """A Gaussian (rows, cols) block from a seeded generator on `device` (on a GPU generated
    there: the CPU's generator costs 18-49 ms for a 4096-11008 x 144 block, bench/NOTES.md).
    The same seed gives the same block on every device of one kind. reuse: keep it for later
    calls with the same shape and seed (a sketch's test matrix need not change per matrix)."""
    dev = torch.device(device)
    key = (rows, cols, dtype, str(dev), seed)
    if reuse:
        hit = _OMEGA.get(key)
        if hit is not None:
            return hit
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = torch.randn(rows, cols, generator=gen, dtype=dtype, device=dev)
    if reuse:
        if len(_OMEGA) >= 32:
            _OMEGA.clear()
        _OMEGA[key] = out
    return out


def cpu_symmetric(h: torch.Tensor) -> torch.Tensor:
    """A small symmetric matrix on the CPU in float64, symmetrised (for LAPACK's eigh there:
    cuSOLVER is slower at these sizes)."""
    hc = h.detach().to("cpu", torch.float64)
    return (hc + hc.mT) * 0.5


def _small_gram(y: torch.Tensor) -> torch.Tensor:
    """y^T y (s, s) on the CPU, float64, symmetrised."""
    return cpu_symmetric(y.mT @ y)


def orth(y: torch.Tensor, rcond: float = 1e-7, ref: float | None = None) -> torch.Tensor:
    """Orthonormal basis (m, r) of the column span of y (m, s), r <= s: directions whose
    singular value in y is below rcond x `ref` (default: y's largest) are dropped.

    Two passes of eigh of the small Gram matrix (y^T y = V L V^T, then y V L^(-1/2)): the first
    leaves columns orthonormal to about u / rcond^2, the second to rounding (like CholeskyQR2,
    but a rank-deficient y is fine)."""
    if y.shape[1] == 0:
        return y
    for step in range(2):
        lam, v = torch.linalg.eigh(_small_gram(y))  # ascending (s,), (s, s)
        top = float(lam[-1])
        floor = (rcond * ref) ** 2 if (step == 0 and ref is not None) else rcond ** 2 * top
        if step == 1:
            floor = max(floor, 1e-4 * top)  # columns are ~unit now: anything small is degenerate
        keep = lam > max(floor, 0.0)
        if not bool(keep.any()) or not top > 0:
            return y[:, :0]
        scale = v[:, keep] / lam[keep].sqrt()  # (s, r)
        y = y @ scale.to(y.device, y.dtype)  # (m, r)
    return y


def norm_lanczos(fwd: Callable, bwd: Callable, n: int, dtype, device, block: int = 4,
                 iters: int = 30, rtol: float = 1e-12, seed: int = 0,
                 start: torch.Tensor | None = None) -> float:
    """||M||_2 for M given by fwd(x) = M x and bwd(y) = M^T y, x (n, b): block Lanczos on
    M^T M with full reorthogonalisation. The estimate is the largest singular value of M Q on
    the Krylov basis Q [X, M^T M X, ...] of a start block X, a lower bound that converges
    from below; it stops when it moves by less than rtol, or when the Krylov space is
    exhausted (then it is exact). X: a seeded random block, or `start` (n, b') beside it when
    given (e.g. a sketch's top right singular vectors: then a few steps converge)."""
    if n == 0:
        return 0.0
    b = max(1, min(block, n))
    x = seeded_randn(n, b, seed, device, dtype, reuse=True)  # (n, b)
    if start is not None and start.numel():
        # the start vectors beside the random block, never instead of it: a start that spans
        # an invariant subspace without the top direction would otherwise hold the Krylov
        # space there for good
        x = torch.cat([start.to(device, dtype), x], dim=1)[:, :n]  # (n, b' + b)
    x = orth(x)  # (n, b)
    b = max(1, x.shape[1])
    qs, ys = [], []
    est = 0.0
    for _ in range(max(1, iters)):
        y = fwd(x)  # (p, b)
        qs.append(x)
        ys.append(y)
        ym = torch.cat(ys, dim=1)  # (p, j b) = M Q
        top = float(torch.linalg.eigvalsh(_small_gram(ym))[-1])  # Ritz value of M^T M
        new = max(top, 0.0) ** 0.5
        if new == 0.0 or abs(new - est) <= rtol * new:
            return max(new, est)
        est = max(new, est)
        qm = torch.cat(qs, dim=1)  # (n, j b)
        if qm.shape[1] + b > n:
            return est
        z = bwd(y)  # (n, b)
        z0 = float(torch.linalg.vector_norm(z))
        for _ in range(2):  # block Gram-Schmidt, twice
            z = z - qm @ (qm.mT @ z)
        x = orth(z, rcond=1e-10, ref=z0)  # what is left of z above rounding
        if x.shape[1] == 0:  # the Krylov space is invariant: the estimate is exact
            return est
    return est


def _chol_qr(z: torch.Tensor) -> torch.Tensor:
    """Columns (n, b) spanning z (n, b), orthonormal to about kappa(z)^2 u, by one shifted
    CholeskyQR entirely on z's device (no host round trip): z^T z (1 + 1e-13 on the diagonal)
    = R^T R, z R^-1. A zero column gives non-finite output. Only for top_eigenvalue, whose
    Rayleigh-Ritz step does not need an orthonormal basis."""
    g = z.mT @ z  # (b, b)
    g.diagonal().mul_(1.0 + 1e-13)
    r = torch.linalg.cholesky_ex(g, upper=True)[0]  # (b, b) upper
    # z R^-1, made row-major: solve_triangular returns it column-major, and with such blocks
    # the products of top_eigenvalue took 1.69 s instead of 0.50 s at n = 2048 (MKL, 2 cores)
    return torch.linalg.solve_triangular(r, z, upper=True, left=False).contiguous()


def top_eigenvalue(apply: Callable, n: int, dtype, device, block: int = 4, steps: int = 24,
                   seed: int = 0) -> float | None:
    """An estimate (from below, up to rounding) of the largest eigenvalue of a symmetric
    operator apply(x) = A x, x (n, b): block Lanczos from a seeded random block, each new
    block orthogonalised against the basis so far, every step on the device and one host
    round trip at the end. None when it broke down (non-finite).
    For callers that prove the bound themselves (slices.inverse_gram fences it by a Cholesky
    factorization): a GPU sync per step costs more there than the products do."""
    if n == 0:
        return 0.0
    b = max(1, min(block, n))
    steps = max(1, min(steps, n // b))
    qm = torch.empty(n, steps * b, dtype=dtype, device=device)  # (n, J b) Krylov basis Q
    wm = torch.empty_like(qm)  # (n, J b) A Q
    q = _chol_qr(seeded_randn(n, b, seed, device, dtype, reuse=True))  # (n, b)
    for j in range(steps):
        qm[:, j * b:(j + 1) * b] = q
        w = apply(q)  # (n, b)
        wm[:, j * b:(j + 1) * b] = w
        if j + 1 < steps:
            prev = qm[:, :(j + 1) * b]  # (n, (j+1) b)
            q = _chol_qr(torch.addmm(w, prev, prev.mT @ w, alpha=-1.0))
    # Q^T A Q and Q^T Q in one transfer. Q is orthonormal only to rounding times conditioning,
    # and after a breakdown (a Krylov space that closed) the new block is amplified rounding,
    # so the Ritz values are taken on the well-conditioned part of span(Q): each one is a
    # Rayleigh quotient of a vector in it, never above the top eigenvalue (up to rounding)
    pair = torch.stack([qm.mT @ wm, qm.mT @ qm]).to("cpu", torch.float64)  # (2, J b, J b)
    if not bool(torch.isfinite(pair).all()):
        return None
    t, bm = (pair[0] + pair[0].mT) * 0.5, (pair[1] + pair[1].mT) * 0.5
    lam, v = torch.linalg.eigh(bm)  # ascending: Q^T Q = V L V^T
    if not float(lam[-1]) > 0:
        return None
    keep = lam > 1e-8 * float(lam[-1])
    c = v[:, keep] / lam[keep].sqrt()  # (J b, r): Q c has orthonormal columns
    return float(torch.linalg.eigvalsh(c.mT @ t @ c)[-1])


def sketch_singular_values(d: torch.Tensor, q: int, p: int = 16, seed: int = 0) -> torch.Tensor:
    """The top q singular values of d (m, n) by a randomized range finder with one power
    iteration (Halko, Martinsson & Tropp, alg. 4.4): bases of d Omega, d^T Y, d Z in turn, then
    the singular values of Q^T d from the eigenvalues of its (s, s) Gram. Values below about
    1e-7 of the largest are not resolved and come back as 0."""
    return sketch_spectrum(d, q, p, seed)[0]


def sketch_spectrum(d: torch.Tensor, q: int, p: int = 16, seed: int = 0,
                    vectors: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sketch_singular_values, and with `vectors` > 0 the right singular vectors (n, vectors) of
    Q^T d for the largest values (approximations of d's own, good starts for norm_lanczos)."""
    m, n = d.shape
    s = min(q + p, m, n)
    omega = seeded_randn(n, s, seed, d.device, d.dtype, reuse=True)  # (n, s)
    y = orth(d @ omega)  # (m, r)
    z = orth(d.mT @ y)  # (n, r): one power iteration
    qm = orth(d @ z)  # (m, r) orthonormal range basis
    c = d.mT @ qm  # (n, r) = (Q^T d)^T
    ev, w = torch.linalg.eigh(_small_gram(c))  # ascending (r,), (r, r): c^T c = W diag(ev) W^T
    ev, w = ev.flip(0), w.flip(1)  # descending, sigma^2
    sv = ev.clamp_min(0).sqrt()
    out = torch.zeros(min(q, m, n), dtype=torch.float64)
    k = min(out.numel(), sv.numel())
    out[:k] = sv[:k]
    right = None
    if vectors > 0:
        j = min(vectors, int((sv > 0).sum()))
        # Q^T d = W diag(sv) V^T  =>  V = c W diag(1 / sv)  (n, j)
        right = c @ (w[:, :j] / sv[:j]).to(c.device, c.dtype)
    return out.to(d.device), right
