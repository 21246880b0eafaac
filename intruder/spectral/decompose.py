"""Singular decompositions for the scan, in float64 on the chosen device.

Default path: eigendecomposition of the smaller Gram matrix in float64 (`gram64`). Squaring the
matrix squares its condition number, but in float64 that leaves singular values down to about
1e-7 of the largest resolved, far below what a weight matrix's top-k matching can see; when a
matrix has smaller singular values the exact float64 SVD runs instead (`svd64`). Tests compare
both with numpy's LAPACK SVD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Below this ratio to sigma_max a Gram-derived singular vector is not trustworthy: fall back.
GRAM_RCOND = 1e-7


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD pieces of one matrix W (m, n); r = number of columns kept."""

    sigma: torch.Tensor  # (r,) float64, descending
    u: Optional[torch.Tensor]  # (m, r) float64 left singular vectors (None if not asked)
    v: Optional[torch.Tensor]  # (n, r) float64 right singular vectors (None if not asked)
    method: str


def full_spectrum(w: torch.Tensor, left: bool = True, right: bool = False,
                  method: str = "auto") -> Spectrum:
    """All min(m, n) singular triplets of w (already on its device), in float64."""
    w = w.to(torch.float64)  # (m, n)
    if method == "svd64":
        return _svd64(w, left, right)
    sigma, u, v = _gram_eigh(w, None, left, right)
    if sigma.numel() and sigma[-1] < GRAM_RCOND * sigma[0]:
        return _svd64(w, left, right)
    return Spectrum(sigma, u, v, "gram64")


def top_spectrum(w: torch.Tensor, k: int, left: bool = True, right: bool = False) -> Spectrum:
    """The top-k singular triplets of w, in float64."""
    w = w.to(torch.float64)  # (m, n)
    sigma, u, v = _gram_eigh(w, k, left, right)
    if sigma.numel() and sigma[-1] < GRAM_RCOND * sigma[0]:
        s = _svd64(w, left, right)
        return Spectrum(s.sigma[:k], None if s.u is None else s.u[:, :k],
                        None if s.v is None else s.v[:, :k], s.method)
    return Spectrum(sigma, u, v, "gram64")


def _svd64(w: torch.Tensor, left: bool, right: bool) -> Spectrum:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u (m, r), s (r,), vh (r, n)
    return Spectrum(s, u if left else None, vh.mT if right else None, "svd64")


def _gram_eigh(w: torch.Tensor, k: Optional[int], left: bool, right: bool):
    """Eigen-decompose the smaller Gram matrix; derive the other side by one product."""
    m, n = w.shape
    if m <= n:
        g = w @ w.mT  # (m, m) = U S^2 U^T
        evals, evecs = torch.linalg.eigh(g)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)  # descending
        if k is not None:
            evals, evecs = evals[:k], evecs[:, :k]
        sigma = evals.clamp_min(0).sqrt()  # (r,)
        u = evecs  # (m, r)
        v = None
        if right:
            v = (w.mT @ u) / sigma.clamp_min(torch.finfo(w.dtype).tiny)  # (n, r) = W^T U S^-1
        return sigma, (u if left else None), v
    g = w.mT @ w  # (n, n) = V S^2 V^T
    evals, evecs = torch.linalg.eigh(g)
    evals, evecs = evals.flip(0), evecs.flip(1)
    if k is not None:
        evals, evecs = evals[:k], evecs[:, :k]
    sigma = evals.clamp_min(0).sqrt()
    v = evecs  # (n, r)
    u = None
    if left:
        u = (w @ v) / sigma.clamp_min(torch.finfo(w.dtype).tiny)  # (m, r) = W V S^-1
    return sigma, u, (v if right else None)


def spectral_norm(d: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """||d||_2 by power iteration on d^T d (float64); a lower bound that converges from below."""
    d = d.to(torch.float64)  # (m, n)
    if d.numel() == 0:
        return 0.0
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(d.shape[1], generator=gen, dtype=torch.float64).to(d.device)  # (n,)
    x /= x.norm()
    est = 0.0
    for _ in range(iters):
        y = d @ x  # (m,)
        z = d.mT @ y  # (n,)
        nz = z.norm()
        if nz == 0:
            return 0.0
        x = z / nz
        est = float((d @ x).norm())
    return est
