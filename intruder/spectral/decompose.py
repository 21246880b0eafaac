"""Singular decompositions for the scan, in float64 on the chosen device.

Exact path (`full_spectrum`, `top_spectrum`): eigendecomposition of the smaller Gram matrix in
float64. Squaring the matrix squares its condition number, but in float64 that leaves singular
values down to about 1e-7 of the largest resolved, far below what a weight matrix's top-k
matching can see; when a matrix has smaller singular values the exact float64 SVD runs instead.
Tests compare both with numpy's LAPACK SVD.

Fast path (`partial.eig_top`): only the top eigenpairs, each with a certified angle bound; the
engine matches with them and falls back to the exact path whenever a bound cannot prove that
the result equals the exact one (see intruder/spectral/certify.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .partial import Eig, derive_other, eig_full
from .scaling import pow2_scale
from .sketch import norm_lanczos


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD pieces of one matrix W (m, n); r = number of triplets kept."""

    sigma: torch.Tensor  # (r,) float64, descending
    u: torch.Tensor | None  # (m, r) float64 left singular vectors (None if not asked)
    v: torch.Tensor | None  # (n, r) float64 right singular vectors (None if not asked)
    method: str
    complete: bool = True  # every min(m, n) triplet is here (else only the top r)
    rest: float = 0.0  # every singular value not kept is <= rest
    err_u: torch.Tensor | None = None  # (r,) CPU: bound on sin(angle) of each u to the exact
    err_v: torch.Tensor | None = None  # (r,) CPU: same for v

    def vecs(self, left: bool) -> torch.Tensor:
        """u (left) or v (right): (m, r) or (n, r); ValueError when that side was not asked."""
        vecs = self.u if left else self.v
        if vecs is None:
            raise ValueError(f"spectrum has no {'left' if left else 'right'} singular vectors")
        return vecs


def spectrum_of(w: torch.Tensor, e: Eig, left: bool, right: bool,
                upto: int | None = None, other_upto: int | None = None) -> Spectrum:
    """Spectrum (u and/or v as asked) of W from the eigenpairs of one of its Gram matrices.
    other_upto: derive only that many of the other side's vectors (then u or v holds fewer
    columns than sigma has values; the caller matches the rest another way)."""
    r = e.r if upto is None else min(upto, e.r)
    sigma = e.vals[:r].clamp_min(0).sqrt() / e.scale  # (r,)
    u = v = eu = ev = None
    need_other = (left and e.side == "right") or (right and e.side == "left")
    r_other = r if other_upto is None else min(other_upto, r)
    other, e_other = derive_other(w, e, r_other) if need_other else (None, None)
    own, e_own = e.vecs[:, :r], e.err[:r]
    if left:
        u, eu = (own, e_own) if e.side == "left" else (other, e_other)
    if right:
        v, ev = (own, e_own) if e.side == "right" else (other, e_other)
    if r < e.r:  # the next kept eigenvalue bounds every one left out
        rest = float(e.vals[r].clamp_min(0).sqrt()) / e.scale
    else:
        rest = 0.0 if e.complete else max(e.rest, 0.0) ** 0.5 / e.scale
    return Spectrum(sigma, u, v, e.method, e.complete and r == e.r, rest, eu, ev)


def full_spectrum(w: torch.Tensor, left: bool = True, right: bool = False,
                  method: str = "auto") -> Spectrum:
    """All min(m, n) singular triplets of w (already on its device), in float64 (weights out
    of the squarable range scaled by an exact power of two, scaling.py)."""
    w = w.to(torch.float64)  # (m, n)
    c = pow2_scale(w)
    if method == "svd64":
        return _svd64(w, left, right)
    ws = w * c if c != 1.0 else w
    return spectrum_of(w, replace(eig_full(ws), scale=c), left, right)


def top_spectrum(w: torch.Tensor, k: int, left: bool = True, right: bool = False) -> Spectrum:
    """The top-k singular triplets of w, in float64 (exact path)."""
    w = w.to(torch.float64)  # (m, n)
    c = pow2_scale(w)
    ws = w * c if c != 1.0 else w
    s = spectrum_of(w, replace(eig_full(ws, check_upto=k), scale=c), left, right, upto=k)
    return Spectrum(s.sigma, s.u, s.v, s.method)


def _svd64(w: torch.Tensor, left: bool, right: bool) -> Spectrum:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u (m, r), s (r,), vh (r, n)
    return Spectrum(s, u if left else None, vh.mT if right else None, "svd64")


def spectral_norm(d: torch.Tensor, iters: int = 30, seed: int = 0, block: int = 4,
                  rtol: float = 1e-13, start: torch.Tensor | None = None) -> float:
    """||d||_2 (float64) by block Lanczos on d^T d (sketch.norm_lanczos): a lower bound that
    converges from below; a few blocks resolve it where power iteration needs dozens of passes.
    start: (n, b) vectors to begin from (e.g. a sketch's top right singular vectors)."""
    d = d.to(torch.float64)  # (m, n)
    if d.numel() == 0:
        return 0.0
    c = pow2_scale(d)
    if c != 1.0:
        d = d * c  # exact: the Lanczos blocks' Gram matrices stay in range
    return norm_lanczos(lambda x: d @ x, lambda y: d.mT @ y, d.shape[1], d.dtype, d.device,
                        block=block, iters=iters, rtol=rtol, seed=seed, start=start) / c
