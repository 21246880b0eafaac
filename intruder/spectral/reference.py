"""Float64 LAPACK reference of the paper's Algorithm 1 (numpy), the yardstick for every fast path.

Two full thin SVDs, |U_t[:, :k]^T U_0|, max over base vectors. Slow and simple on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReferenceResult:
    max_cos: np.ndarray  # (k,) float64
    base_index: np.ndarray  # (k,) int
    sigma_tuned: np.ndarray  # (k,)
    sigma_base: np.ndarray  # (min(m, n),)
    intruders: np.ndarray  # (k,) bool at epsilon


def reference_intruders(w0, wt, top_k: int = 10, epsilon: float = 0.5,
                        vectors: str = "left") -> ReferenceResult:
    """Algorithm 1 in float64 with numpy's LAPACK SVD (gesdd)."""
    w0 = np.asarray(w0, dtype=np.float64)  # (m, n)
    wt = np.asarray(wt, dtype=np.float64)  # (m, n)
    if vectors == "right":
        w0, wt = w0.T, wt.T  # right singular vectors of W are left ones of W^T
    u0, s0, _ = np.linalg.svd(w0, full_matrices=False)  # u0 (m, r), s0 (r,)
    ut, st, _ = np.linalg.svd(wt, full_matrices=False)  # ut (m, r)
    k = min(top_k, ut.shape[1])
    sim = np.abs(ut[:, :k].T @ u0)  # (k, r)
    max_cos = sim.max(axis=1)  # (k,)
    return ReferenceResult(max_cos, sim.argmax(axis=1), st[:k], s0, max_cos < epsilon)


def reference_counts(w0, wt, top_k: int, epsilons: Sequence[float]) -> dict:
    """Intruder counts per epsilon from the reference."""
    r = reference_intruders(w0, wt, top_k, epsilon=max(epsilons))
    return {float(e): int((r.max_cos < e).sum()) for e in epsilons}
