"""Certified top eigenpairs of a Gram matrix, the fast path of both sides of a scan.

`eig_top(g, want)` returns the `want` largest eigenpairs of a symmetric positive semi-definite
G (d, d) with a proof, not a hope, that they are right:

1. Chebyshev-filtered subspace iteration (Zhou & Saad) with Rayleigh-Ritz, converged vectors
   locked, until every wanted residual ||G x - theta x|| is at the float64 floor.
2. A Cholesky certificate: if  mu I - (G - X Theta X^T)  factors, every eigenvalue of G outside
   the `want` found is <= mu (+ rounding terms), by Weyl's inequality for the rank-`want` PSD
   term X Theta X^T. Nothing can hide above mu, whatever the start block missed.
3. With the rest of the spectrum fenced below mu and each found eigenvalue fenced in its
   residual interval, the single-vector Davis-Kahan bound gives every vector's angle to the exact
   eigenvector: err_i = ||r_i|| / gap_i.

When any step fails (no convergence, a gap too small for `VEC_TOL`, a failed factorization) the
result is None and the caller runs the exact float64 eigendecomposition instead. `eig_full` is
that exact path (what the engine always did before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lapack import syevr_top
from .sketch import cpu_symmetric, seeded_randn

U64 = 2.0 ** -53  # unit roundoff of float64
# Angle bound (sin) a certified vector may carry; above it, the exact path runs. The bounds are
# worst-case rounding analyses (gamma_n * ||W||_F^2 for the Gram, d u ||.|| for products), so
# the errors they allow are far above the real ones (measured: 1e-13 against the exact engine);
# 1e-5 guarantees |max_cos error| <= 3e-5 < 1e-4 even under the worst case.
VEC_TOL = 1e-5
# Below this ratio to sigma_max a Gram-derived singular vector is not trustworthy (exact SVD).
GRAM_RCOND = 1e-7
MAX_SWEEPS = 12


@dataclass(frozen=True)
class Eig:
    """Top eigenpairs of the Gram matrix of one side of W (m, n): G = W W^T (side 'left') or
    W^T W (side 'right'); eigenvalues are sigma^2."""

    vals: torch.Tensor  # (r,) float64 descending, on the device of vecs
    vecs: torch.Tensor  # (d, r) float64 orthonormal, d = m (left) or n (right)
    err: torch.Tensor  # (r,) float64 CPU: bound on sin(angle to the exact eigenvector)
    rest: float  # every eigenvalue not in vals is <= rest (0.0 when complete)
    complete: bool  # vals holds all min(m, n) eigenvalues
    side: str  # left | right: which singular vectors vecs are
    method: str
    other: torch.Tensor | None = None  # (d_other, r) other side's vectors (exact SVD path)
    # vals are the eigenvalues of the Gram matrix of (scale W), scale a power of two (1 but for
    # float64 weights whose squares would leave float64's range: intruder/spectral/scaling.py)
    scale: float = 1.0

    def __post_init__(self):
        # One layout whatever produced the pairs (a slice of a wider block, LAPACK's output, a
        # cache entry read back): the products taken with them then run the same BLAS kernels,
        # so a warm scan (base from the cache) and a cold one compute the same thing.
        for name in ("vals", "vecs", "other"):
            t = getattr(self, name)
            if t is not None and not t.is_contiguous():
                object.__setattr__(self, name, t.contiguous())

    @property
    def r(self) -> int:
        return int(self.vals.numel())

    def to(self, device) -> Eig:
        return Eig(self.vals.to(device), self.vecs.to(device), self.err, self.rest, self.complete,
                   self.side, self.method, None if self.other is None else self.other.to(device),
                   self.scale)


def gram_side(shape) -> str:
    """Side whose Gram matrix is the smaller one: left (m <= n) or right."""
    return "left" if shape[0] <= shape[1] else "right"


def gram(w: torch.Tensor, side: str) -> torch.Tensor:
    """W W^T (m, m) for side 'left', W^T W (n, n) for 'right'; float64.

    Large Grams come from the upper block triangle (_gram_blocked: 10/16 of the flops), on a
    CPU from d = 256 (measured at 576: 4.1 ms against 8.3 ms for the plain product; BLAS dsyrk
    through scipy halves the flops but holds the GIL, and a CPU scan computes one matrix per
    core in threads), on a GPU from 2048."""
    d = w.shape[0] if side == "left" else w.shape[1]
    if d >= (2048 if w.device.type == "cuda" else 256):
        return _gram_blocked(w if side == "left" else w.mT, 4)
    g = w @ w.mT if side == "left" else w.mT @ w  # (d, d)
    return symmetrise_(g, max(1, d // 1024))


def symmetrise_(g: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Make g (d, d) exactly symmetric in place, by blocks of rows (temporaries of one block):
    a GEMM's A A^T is symmetric only up to its summation order, which depends on the BLAS
    code path (MKL's AVX2 and AVX-512 kernels differ); the eigensolvers and the Cholesky
    certificate are stated for a symmetric matrix, so it is made one. Diagonal blocks become
    (B + B^T) / 2 (exactly symmetric: addition commutes), the lower triangle of blocks a copy
    of the upper one."""
    d = g.shape[0]
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for i in range(blocks):
        a, b = edges[i], edges[i + 1]
        blk = g[a:b, a:b]  # (di, di)
        blk.copy_((blk + blk.mT).mul_(0.5))
        for j in range(i + 1, blocks):
            g[edges[j]:edges[j + 1], a:b] = g[a:b, edges[j]:edges[j + 1]].mT
    return g


def _gram_blocked(a: torch.Tensor, blocks: int) -> torch.Tensor:
    """A A^T (d, d) for a (d, k) from the upper block triangle: blocks (blocks + 1) / 2 products
    of (d/blocks, k) x (k, d/blocks) instead of blocks^2 (10/16 of the flops for 4), mirrored;
    exactly symmetric (diagonal blocks symmetrised).
    No syrk is exposed on a GPU through torch; these GEMMs are large enough to run at full rate."""
    d = a.shape[0]
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    g = torch.empty(d, d, dtype=a.dtype, device=a.device)
    for i in range(blocks):
        ai = a[edges[i]:edges[i + 1]]  # (di, k)
        for j in range(i, blocks):
            aj = a[edges[j]:edges[j + 1]]  # (dj, k)
            blk = ai @ aj.mT  # (di, dj)
            if j == i:  # a GEMM's ai ai^T is symmetric only up to its summation order
                blk = (blk + blk.mT).mul_(0.5)
            g[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = blk
            if j != i:
                g[edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = blk.mT
    return g


def gram_error(w: torch.Tensor, g: torch.Tensor) -> float:
    """Bound on ||computed G - exact G||_2 from float64 rounding: gamma_inner * ||W||_F^2."""
    inner = max(w.shape)
    return 1.01 * inner * U64 * float(torch.diagonal(g).sum().abs())


def eig_full(w: torch.Tensor, side: str | None = None, check_upto: int | None = None,
             g: torch.Tensor | None = None) -> Eig:
    """Every eigenpair of the smaller Gram matrix in float64 (torch.linalg.eigh); the exact SVD
    when W is too ill-conditioned for the Gram route (sigma below GRAM_RCOND * sigma_1 among
    the first `check_upto`, default all). Error bounds are reported as 0: this is the engine's
    reference-equivalent path, tested against LAPACK. g: gram(w, side) when the caller has it."""
    side = side or gram_side(w.shape)
    if g is None:
        g = gram(w, side)  # (d, d)
    evals, evecs = torch.linalg.eigh(g)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    last = evals.numel() if check_upto is None else min(check_upto, evals.numel())
    if last and float(evals[last - 1]) < (GRAM_RCOND ** 2) * float(evals[0]):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u (m, r), s (r,), vh (r, n)
        vecs, other = (u, vh.mT) if side == "left" else (vh.mT, u)
        return Eig(s.square(), vecs, torch.zeros(s.numel(), dtype=torch.float64), 0.0, True,
                   side, "svd64", other)
    vals = evals.clamp_min(0)
    return Eig(vals, evecs, torch.zeros(vals.numel(), dtype=torch.float64), 0.0, True, side,
               "gram64")


def _orth(y: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(y)  # (d, s) orthonormal columns
    return q


def _small_eigh(h: torch.Tensor):
    """eigh of a small symmetric matrix on the CPU (cuSOLVER is slow at this size); descending."""
    th, z = torch.linalg.eigh(cpu_symmetric(h))  # ascending
    return th.flip(0), z.flip(1).to(h.device)


def _rayleigh_ritz(g: torch.Tensor, q: torch.Tensor):
    """Ritz values (CPU, descending), Ritz vectors (d, s) and residual norms (CPU) on span(q)."""
    gq = g @ q  # (d, s)
    th, z = _small_eigh(q.mT @ gq)  # (s,), (s, s)
    x = q @ z  # (d, s)
    gx = gq @ z  # (d, s)
    r = gx - x * th.to(x.device)  # (d, s) residuals G x - theta x
    res = torch.linalg.vector_norm(r, dim=0).cpu()  # (s,)
    return th, x, res


def _chebyshev(g: torch.Tensor, y: torch.Tensor, degree: int, b: float, top: float,
               lock: torch.Tensor | None = None):
    """p(A) y with p the degree-`degree` Chebyshev polynomial of [0, b] (damped, |p| <= 1 there
    after scaling) normalised to 1 at `top` > b (Zhou & Saad's scaled three-term recurrence).
    A = P G P with P the projector away from the locked vectors `lock` (d, l): their directions
    are never amplified, so locking costs no accuracy.

    A is formed once (two rank-l updates of G), so that each of the `degree` steps is one GEMM
    and one vector update: on a GPU every step was six kernels and as many host dispatches
    (the matrix products against `lock` and three vector updates), which is what bounded the
    iteration there, not the GEMM itself."""
    a_op = g
    if lock is not None:
        # P G P = G - L C^T - C L^T,  C = G L - L (L^T G L) / 2  (d, l): exact for orthonormal L
        gl = g @ lock  # (d, l)
        cm = torch.addmm(gl, lock, lock.mT @ gl, alpha=-0.5)  # (d, l)
        a_op = torch.addmm(g, lock, cm.mT, alpha=-1.0)  # (d, d)
        a_op.addmm_(cm, lock.mT, alpha=-1.0)
        del gl, cm
        y = torch.addmm(y, lock, lock.mT @ y, alpha=-1.0)  # into range(P)
    e = c = 0.5 * b
    sigma1 = e / (top - c)
    sigma = sigma1
    y1 = torch.addmm(y, a_op, y, beta=-c).mul_(sigma1 / e)  # (A - c) y * s1/e
    for _ in range(2, degree + 1):
        sigma_new = 1.0 / (2.0 / sigma1 - sigma)
        a = 2.0 * sigma_new / e
        # y2 = a A y1 - c a y1 - sigma sigma_new y  (d, s)
        y2 = torch.addmm(y, a_op, y1, beta=-(sigma * sigma_new), alpha=a)
        y2.add_(y1, alpha=-c * a)
        y, y1 = y1, y2
        sigma = sigma_new
    return y1


def _degree(top: float, target: float, b: float) -> int:
    """Filter degree: amplify `target` by ~1e8 over [0, b], but keep the ratio between `top` and
    b below ~1e11 so that QR still resolves the weakest columns in float64."""
    x_top = 2.0 * top / b - 1.0
    x_t = 2.0 * target / b - 1.0
    if x_t <= 1.0 + 1e-12:
        return 24
    want = math.ceil(math.acosh(1e8) / math.acosh(x_t))
    cap = max(2, math.floor(math.acosh(1e11) / math.acosh(max(x_top, 1.0 + 1e-12))))
    return int(max(2, min(want, cap, 40)))


def eig_top(g: torch.Tensor, want: int, start: torch.Tensor | None = None, seed: int = 0,
            eps_g: float = 0.0, side: str = "left", extra: int | None = None) -> Eig | None:
    """Certified top-`want` eigenpairs of PSD g (d, d) in float64, or None (use eig_full).

    start (d, c): vectors to seed the block with (e.g. the base's top vectors for the tuned
    side); the rest of the block is Gaussian (seeded: results are reproducible). eps_g: bound on
    the error of g itself (gram_error)."""
    d = g.shape[0]
    dev = g.device
    extra = extra if extra is not None else max(12, want // 2)
    s = want + extra
    if want < 1 or 2 * s >= d:
        return None

    y = seeded_randn(d, s, seed, dev)  # (d, s)
    if start is not None and start.numel():
        c = min(start.shape[1], s - 4)
        y[:, :c] = start[:, :c].to(dev, torch.float64)
    th, x, res = _rayleigh_ritz(g, _orth(y))
    floor = max(1e-13, 32 * U64 * math.sqrt(d))
    for _ in range(MAX_SWEEPS):
        tol = floor * float(th[0])
        conv = res <= tol  # (s,) CPU bool
        if bool(conv[:want].all()):
            break
        nlock = 0
        while nlock < want and bool(conv[nlock]):
            nlock += 1
        b = float(th[-1])
        top = float(th[nlock]) + float(res[nlock])
        if not b > 0 or not top > b:
            return None
        deg = _degree(top, float(th[want - 1]), b)
        xl = x[:, :nlock]  # (d, nlock) locked Ritz vectors
        ya = x[:, nlock:]  # (d, s - nlock) active
        ya = _chebyshev(g, ya, deg, b, top, lock=xl if nlock else None)
        th, x, res = _rayleigh_ritz(g, _orth(torch.cat([xl, ya], dim=1)))
    else:
        if not bool((res[:want] <= floor * float(th[0]) * 10).all()):
            return None
    return _certify(g, th, x, res, want, eps_g, side)


def _certify(g: torch.Tensor, th: torch.Tensor, x: torch.Tensor, res: torch.Tensor, w: int,
             eps_g: float, side: str) -> Eig | None:
    """Fence the unfound spectrum below mu by a Cholesky factorization, then bound each angle."""
    d = g.shape[0]
    thw = th[:w].clamp_min(0.0)  # (w,) CPU
    if not float(thw[-1]) > 0:
        return None
    xw = x[:, :w]  # (d, w)
    trace_g = float(torch.diagonal(g).sum())
    # rounding of the residual products and of the deflation, on top of G's own error
    eps = eps_g + (d + w + 4) * U64 * (trace_g + float(thw.sum()))
    nxt = float(th[w]) if th.numel() > w else 0.0
    nres = float(res[w]) if res.numel() > w else 0.0
    lo_w = float(thw[-1])
    cands = [max(nxt + nres, nxt) + 1e-3 * (lo_w - nxt), 0.5 * (lo_w + nxt)]
    rest = None
    # B = G - X Theta X^T  (d, d); the certificate factors mu I - B
    b = torch.addmm(g, xw * thw.to(xw.device), xw.mT, beta=1.0, alpha=-1.0)
    for mu in cands:
        if not mu < lo_w:
            continue
        m = -b
        m.diagonal().add_(mu)
        _, info = torch.linalg.cholesky_ex(m)
        if int(info) == 0:
            tr_m = float(torch.diagonal(m).sum())
            rest = mu + 1.01 * (d + 1) * U64 * abs(tr_m) + eps
            break
        del m
    del b
    if rest is None:
        return None
    return _bound(thw, xw, res[:w], rest, eps, trace_g, d, side, "cheb64", eps_included=True)


def _bound(thw, xw, res, rest, eps, trace_g, d, side, method, eps_included=False):
    """Residual intervals disjoint and above `rest`, then err_i = ||r_i|| / gap_i (Davis-Kahan)."""
    w = thw.numel()
    if not eps_included:
        eps = eps + (d + w + 4) * U64 * (abs(trace_g) + float(thw.sum()))
        rest = rest + eps
    thl = thw.tolist()
    rl = (res + eps).tolist()
    if not thl or thl[-1] - rl[-1] <= rest:
        return None
    for i in range(w - 1):  # residual intervals disjoint: one eigenvalue in each
        if thl[i] - thl[i + 1] <= rl[i] + rl[i + 1]:
            return None
    err = []
    for i in range(w):
        gap = thl[i] - rest
        if i > 0:
            gap = min(gap, thl[i - 1] - thl[i] - rl[i - 1])
        if i + 1 < w:
            gap = min(gap, thl[i] - thl[i + 1] - rl[i + 1])
        if not gap > 0:
            return None
        err.append(rl[i] / gap)
    err_t = torch.tensor(err, dtype=torch.float64)
    if float(err_t.max()) > VEC_TOL:
        return None
    return Eig(thw.to(xw.device), xw, err_t, rest, False, side, method)


def eig_top_lapack(g: torch.Tensor, want: int, eps_g: float = 0.0,
                   side: str = "left") -> Eig | None:
    """Top-`want` eigenpairs by LAPACK's MRRR on an index range (dsyevr, lapack.py): on a CPU it
    skips most of the back-transformation a full eigh pays for. Certified like eig_top, with
    the (want+1)-th eigenvalue, raised by LAPACK's backward-error bound, as the fence."""
    d = g.shape[0]
    if want + 1 >= d:
        return None
    gn = g.detach().cpu().numpy()
    vals, vecs = syevr_top(gn, want + 1)  # ascending (want+1,), (d, want+1)
    # copied into torch's own (aligned) memory: the kept vectors are then laid out as a cached
    # entry's are when read back, so cold and warm scans feed BLAS the same arrays
    th = torch.from_numpy(vals[::-1].copy()).clone()  # (want+1,) descending
    x = torch.from_numpy(vecs[:, ::-1].copy()).clone().to(g.device)  # (d, want+1)
    r = g @ x[:, :want] - x[:, :want] * th[:want].to(g.device)  # (d, want) residuals
    res = torch.linalg.vector_norm(r, dim=0).cpu()
    trace_g = float(torch.diagonal(g).sum())
    rest = float(th[want]) + 8 * d * U64 * abs(trace_g)
    return _bound(th[:want].clamp_min(0.0), x[:, :want], res, rest, eps_g, trace_g, d, side,
                  "evr64")


def derive_other(w: torch.Tensor, e: Eig, upto: int | None = None):
    """The other side's vectors of the first `upto` pairs: U = W V / sigma or V = W^T U / sigma,
    with their angle bounds (the error of the Gram-side vector grows by sigma_1 / sigma_i).
    Returns (vectors (d_other, r), err (r,) CPU)."""
    r = e.r if upto is None else min(upto, e.r)
    if e.other is not None:
        return e.other[:, :r], e.err[:r].clone()
    sig = e.vals[:r].clamp_min(0).sqrt() / e.scale  # (r,) singular values of W
    tiny = torch.finfo(torch.float64).tiny
    vec = e.vecs[:, :r]  # (d, r)
    prod = (w.mT @ vec) if e.side == "left" else (w @ vec)  # (d_other, r)
    out = prod / sig.clamp_min(tiny)
    if e.complete and not bool(e.err.any()):
        return out, e.err[:r].clone()
    s_cpu = sig.cpu()
    s1 = float(s_cpu[0]) if r else 0.0
    norms = torch.linalg.vector_norm(out, dim=0).cpu()  # (r,) ~1
    ev = e.err[:r]
    amp = s1 / s_cpu.clamp_min(tiny)
    err = ev * amp / (1.0 - ev).clamp_min(1e-300) + (norms - 1.0).abs() + 1e-14
    return out, err
