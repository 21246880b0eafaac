"""Exact power-of-two scaling for float64 weights whose squares leave float64's range.

The engine forms Gram matrices (W W^T, y^T y) and squared norms: entries near 1e-165 square
to 1e-330, below the smallest float64 (every eigenvalue becomes 0 and every vector noise),
entries near 1e200 square to inf. Only float64 tensors can hold such values (float32's range
squares into float64's), so only they are checked. Multiplying by a power of two c is exact
and IEEE arithmetic commutes with it away from underflow and overflow, so scanning (c W0, c Wt)
and dividing the absolute outputs by c gives the unscaled answer, not an approximation of it.
Weights in the ordinary range are not scaled at all (c = 1, results unchanged to the bit).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from ..types import Analysis
from .partial import Eig

# |W| below 2^-LIMIT or above 2^LIMIT (its largest entry) is scaled: squares then stay within
# 2^(+-2 LIMIT) and their sums over 2^20 terms far inside float64's 2^(+-1022)
LIMIT = 300
def pow2_scale(*ts: torch.Tensor | None) -> float:
    """A power of two c with c * max|t| in [0.5, 1) when the largest entry of the float64
    tensors among ts lies outside [2^-LIMIT, 2^LIMIT]; else 1.0. Other dtypes cost nothing."""
    top = 0.0
    for t in ts:
        if t is not None and t.dtype == torch.float64 and t.numel():
            top = max(top, float(t.abs().max()))
    if top == 0.0 or not math.isfinite(top) or 2.0 ** -LIMIT <= top <= 2.0 ** LIMIT:
        return 1.0
    _, e = math.frexp(top)  # top = m 2^e, m in [0.5, 1)
    return math.ldexp(1.0, -e)


def rescale_eig(spec, c: float):
    """A base spectrum (cached, or from an earlier pair) in the units of a scan of (c W0):
    an Eig whose vals are the Gram eigenvalues of (c W0), scale 1; None when it cannot be
    expressed there (then the engine decomposes the base again)."""
    if not isinstance(spec, Eig):
        return spec if c == 1.0 else None
    if spec.scale == c:
        return replace(spec, scale=1.0) if c != 1.0 else spec
    f = (c / spec.scale) ** 2  # a power of two: exact unless it leaves the range
    vals = spec.vals * f
    rest = spec.rest * f
    top = float(spec.vals[0]) if spec.vals.numel() else 0.0
    if not (math.isfinite(rest) and bool(torch.isfinite(vals).all())) or \
            (top > 0 and not float(vals[0]) > 0):
        return None
    return replace(spec, vals=vals, rest=rest, scale=1.0)


def unscale(found: Analysis, c: float) -> Analysis:
    """Absolute (sigma-valued) measures of a scan of (c W0, c Wt) back in the units of W0, Wt:
    the singular values, the intruders' sigma, and dW's spectrum and rounding floor."""
    inv = 1.0 / c
    shape = found.update_shape
    if shape is not None:
        shape = replace(shape, floor=None if shape.floor is None else shape.floor * inv,
                        sv=tuple(x * inv for x in shape.sv))
    return replace(found, sigma_base=tuple(s * inv for s in found.sigma_base),
                   sigma_tuned=tuple(s * inv for s in found.sigma_tuned),
                   intruders=tuple(replace(i, sigma=i.sigma * inv) for i in found.intruders),
                   update_shape=shape)


def analyse_scaled(inner: Callable, w0: torch.Tensor, wt: torch.Tensor, config, name: str,
                   base_spec, scratch: dict | None = None,
                   noise: float | None = None) -> tuple[Analysis, Eig]:
    """inner (the engine's analysis) on (c W0, c Wt) with c = pow2_scale(W0, Wt); outputs in
    the units of W0 and Wt, the base spectrum tagged with its scale (what the cache stores).
    A scaled pair shares no scratch (base-only work in other units) with its fleet."""
    c = pow2_scale(w0, wt)
    spec = rescale_eig(base_spec, c)
    if c == 1.0:
        return inner(w0, wt, config, name, spec, scratch, noise)
    w0s = w0.to(torch.float64) * c  # (m, n) exact
    wts = wt.to(torch.float64) * c  # (m, n) exact
    found, be = inner(w0s, wts, config, name, spec, None, None if noise is None else noise * c)
    return unscale(found, c), replace(be, scale=c)
