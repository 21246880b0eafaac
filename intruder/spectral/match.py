"""Matching tuned singular vectors against the base's (Algorithm 1, steps 2-3) and the caveat measures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Match:
    """Similarity of the top-k tuned vectors of one side against all base vectors of that side."""

    max_cos: torch.Tensor  # (k,) float64: max_i |<t_j, b_i>|
    base_index: torch.Tensor  # (k,) int64: argmax_i
    near_overlap: torch.Tensor  # (k,): ||projection of t_j onto base vectors with sigma near sigma_j||
    top_overlap: torch.Tensor  # (k,): ||projection of t_j onto the top-r base subspace||
    near_size: torch.Tensor  # (k,) int64: how many base vectors are "near" in sigma


def match_vectors(t_vecs: torch.Tensor, t_sigma: torch.Tensor, b_vecs: torch.Tensor,
                  b_sigma: torch.Tensor, near_window: float = 0.1, top_r: int = 20,
                  sim: torch.Tensor | None = None) -> Match:
    """|cos| between tuned vectors t (d, k) and base vectors b (d, r), with subspace overlaps.
    sim: |T^T B| (k, r) when the caller has it another way (then b_vecs is not read)."""
    if sim is None:
        sim = (t_vecs.mT @ b_vecs).abs().clamp_max(1.0)  # (k, r) = |T^T B|, rounding clipped
    max_cos, base_index = sim.max(dim=1)  # (k,), (k,)
    sq = sim.square()  # (k, r)
    # Base vectors whose sigma lies within a relative window of the tuned sigma: a tuned vector
    # that is a rotation inside such a near-degenerate cluster projects strongly onto their span.
    near = (b_sigma[None, :] - t_sigma[:, None]).abs() <= near_window * t_sigma[:, None]  # (k, r)
    near_overlap = (sq * near).sum(dim=1).clamp_max(1.0).sqrt()  # (k,)
    r = min(top_r, sim.shape[1])
    top_overlap = sq[:, :r].sum(dim=1).clamp_max(1.0).sqrt()  # (k,)
    return Match(max_cos, base_index, near_overlap, top_overlap, near.sum(dim=1))


def counts_by_epsilon(max_cos: torch.Tensor, epsilons: Sequence[float]):
    """((epsilon, number of vectors with max_cos < epsilon), ...) sorted by epsilon."""
    return tuple((float(e), int((max_cos < e).sum())) for e in sorted(set(epsilons)))
