"""Proof that matching against the base's top-R singular vectors gives the full answer.

Algorithm 1 takes, for each top-k tuned vector t_j, the maximum of |<t_j, b_i>| over ALL base
vectors b_i. With only the top-R base vectors (certified, angle bounds e_i) the maximum is still
exact when the found maximum beats everything the other vectors could hold: the b_i are
orthonormal, so  sum_i <t_j, b_i>^2 <= ||t_j||^2 = 1  and every base vector left out has
|<t_j, b_i>| <= sqrt(1 - sum over the kept ones of (|c_ji| - e_j)^2).

The report's other base-side measures need: the near-degenerate window (every base vector with
sigma within near_window of sigma_j kept: rest < (1 - near_window) sigma_j), the top-r overlap
and sigma_base (R >= top_r and R >= k + 5). Anything unproven sends the engine to a larger R or
to the exact full decomposition. When a tuned vector lies mostly outside the kept span (an
intruder), spectral slices of the base (slices.py) bound every left-out base vector's |cos|;
`slice_decisions` accepts them when they decide every epsilon.
"""

from __future__ import annotations

import torch


def match_error(t_err: torch.Tensor | None, b_err: torch.Tensor | None, k: int) -> torch.Tensor:
    """(k,) CPU bound on | computed |<t_j, b_i>| - exact | from the vectors' angle bounds: two unit
    vectors an angle a apart differ by 2 sin(a/2) <= sqrt(2) sin(a) in norm."""
    te = t_err[:k].double().cpu() if t_err is not None else torch.zeros(k, dtype=torch.float64)
    be = float(b_err.max()) if b_err is not None and b_err.numel() else 0.0
    return 1.5 * (te + be) + 1e-12


TAIL = "a tuned vector may match a base vector outside the kept ones"


def kept_bounds(t_vecs: torch.Tensor, t_err, b_vecs: torch.Tensor, b_err, k: int):
    """For each tuned vector: (best |cos| among the kept base vectors (k,), its error bound e
    (k,), the most any left-out base vector can hold by orthonormality (k,)), all CPU."""
    sim = (t_vecs[:, :k].mT @ b_vecs).abs().cpu()  # (k, R) = |T^T B|
    e = match_error(t_err, None, k) + match_error(None, b_err, k) - 1e-12  # (k,)
    lower = (sim - e[:, None]).clamp_min(0.0)  # (k, R)
    tail = (1.0 + 1e-12 - lower.square().sum(dim=1)).clamp_min(0.0).sqrt()  # (k,)
    return sim.max(dim=1).values, e, tail, lower.square().sum(dim=1)


def certify_side(t_vecs: torch.Tensor, t_sigma: torch.Tensor, t_err, b_vecs: torch.Tensor,
                 b_err, b_rest: float, b_complete: bool, b_dim: int, near_window: float,
                 top_r: int, k: int) -> str:
    """'' when matching t (d, k) against the kept base vectors b (d, R) is provably the full
    answer; else the reason it is not (the engine then widens or completes the base)."""
    if b_complete:
        return ""
    r = b_vecs.shape[1]
    if r < min(max(top_r, k + 5), b_dim):
        return f"only {r} base vectors kept"
    sig_t = t_sigma[:k].double().cpu()  # (k,)
    if not b_rest < (1.0 - near_window) * float(sig_t.min()) * (1.0 - 1e-9):
        return "near-degenerate window reaches past the kept base vectors"
    best, e, tail, energy = kept_bounds(t_vecs, t_err, b_vecs, b_err, k)
    bad = ~(best - e > tail + e)
    if bool(bad.any()):
        # most of a vector outside the kept span (an intruder spreads over the whole base):
        # widening will not help; spectral slices (slices.py) or the complete base will
        return ("full: " if float(energy[bad].min()) < 0.5 else "") + TAIL
    return ""


def slice_decisions(best: torch.Tensor, e: torch.Tensor, out: torch.Tensor, epsilons):
    """With `out` (k,) bounding every left-out base vector's |cos| (slices.py): (value (k,),
    bound (k,) bool) when every decision at every epsilon is proved, else None. value is the
    exact maximum where the best kept vector beats every left-out one (bound False), else an
    upper bound on it (bound True)."""
    exact = best - e > out + e  # the kept maximum is the maximum
    upper = torch.maximum(best + e, out).clamp_max(1.0)  # (k,)
    lower = (best - e).clamp_min(0.0)  # (k,)
    for eps in epsilons:
        decided = exact | (upper < eps) | (lower >= eps)
        if not bool(decided.all()):
            return None
    return torch.where(exact, best, upper), ~exact
