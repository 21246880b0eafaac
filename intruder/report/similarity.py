"""Similarity blocks |cos(tuned_j, base_i)| for the paper's Figure 1 view, recomputed on demand.

The scan report keeps only each tuned vector's best match (max|cos| and its base index), not the
k x N similarity matrices: those would multiply the JSON by N and are only drawn for a handful of
layers. The report writer therefore re-reads just those layers from the checkpoints named in the
report (after checking that their fingerprints still match), decomposes them in float64 with the
scan's own routines, and keeps a small block: top-k tuned vectors against the top-N base vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import IntruderError, ReportError
from ..io import open_checkpoint, pair_checkpoints, read_ref
from ..io.identity import recorded_mismatch
from ..run.load import load_pair
from ..spectral.decompose import top_spectrum
from ..types import ScanReport


@dataclass(frozen=True)
class SimilarityBlock:
    """|<t_j, b_i>| for tuned vectors j < k (rows) and base vectors i < N (columns)."""

    name: str
    side: str  # left | right: which singular vectors
    cos: tuple[tuple[float, ...], ...]  # (k, N)
    sigma_tuned: tuple[float, ...]  # (k,)
    sigma_base: tuple[float, ...]  # (N,)
    intruders: tuple[int, ...]  # rows flagged by the scan at the report's first epsilon
    max_cos: tuple[float, ...]  # (k,) the scan's max over *all* base vectors, for the caption


def blocks_from_arrays(name: str, side: str, cos, sigma_tuned, sigma_base, intruders,
                       max_cos) -> SimilarityBlock:
    return SimilarityBlock(name, side, tuple(tuple(float(x) for x in row) for row in cos),
                           tuple(float(s) for s in sigma_tuned), tuple(float(s) for s in sigma_base),
                           tuple(int(i) for i in intruders), tuple(float(c) for c in max_cos))


def recompute_similarity(report: ScanReport, names: Sequence[str], n_base: int | None = None,
                         base_path: str | None = None, tuned_path: str | None = None,
                         check_fingerprint: bool = True) -> dict[str, SimilarityBlock]:
    """Re-read the named layers from the report's checkpoints and compute their blocks.

    n_base defaults to 2 * top_k. Raises ReportError when a checkpoint is missing or no longer
    matches the fingerprint recorded by the scan (the blocks would describe other weights)."""
    import torch

    cfg = report.config
    k = cfg.top_k
    n_base = n_base or 2 * k
    side = "right" if cfg.vectors == "right" else "left"
    bp = base_path or report.base.path
    tp = tuned_path or report.tuned.path
    cks = []
    for role, path, info in (("base", bp, report.base), ("tuned", tp, report.tuned)):
        try:
            ck = open_checkpoint(path, allow_adapter=(role == "tuned"))
        except IntruderError as exc:  # say which side and what the heatmaps needed it for
            raise ReportError(f"cannot recompute similarity heatmaps: {role} checkpoint: {exc}") from exc
        why = recorded_mismatch(ck, info) if check_fingerprint else None
        if why:
            raise ReportError(f"{path}: {role} checkpoint changed since the scan ({why}); "
                              f"rescan it or leave out the similarity heatmaps")
        cks.append(ck)
    pairing = pair_checkpoints(cks[0], cks[1], cfg.include, cfg.exclude)
    by_name = {p.name: p for p in pairing.pairs}
    layers = {l.name: l for l in report.layers}
    handles: dict = {}
    out: dict[str, SimilarityBlock] = {}
    for name in names:
        pair = by_name.get(name)
        if pair is None:
            raise ReportError(f"{name!r}: not among the paired matrices of {bp} and {tp}")
        loaded = load_pair(pair, lambda ref: read_ref(ref, handles), allow_nonfinite=True)
        if loaded.status != "scanned":
            continue
        assert loaded.w0 is not None and loaded.wt is not None  # both read for a scanned pair
        w0 = loaded.w0.to(torch.float64)  # (m, n)
        wt = loaded.wt.to(torch.float64)  # (m, n)
        left = side == "left"
        nb = min(n_base, min(w0.shape))
        b = top_spectrum(w0, nb, left=left, right=not left)
        t = top_spectrum(wt, min(k, min(w0.shape)), left=left, right=not left)
        tv, bv = (t.u, b.u) if left else (t.v, b.v)  # (d, k), (d, N)
        assert tv is not None and bv is not None  # the side asked of top_spectrum
        cos = (tv.mT @ bv).abs()  # (k, N)
        lr = layers.get(name)
        if lr is not None:
            _check_same_weights(name, lr, t.sigma.tolist(), cos, nb if cfg.vectors != "both" else 0)
        out[name] = blocks_from_arrays(
            name, side, cos.tolist(), t.sigma.tolist(), b.sigma.tolist(),
            [i.index for i in lr.intruders] if lr else [], lr.max_cos if lr else cos.max(1).values.tolist())
        del w0, wt, loaded
    return out


def _check_same_weights(name: str, layer, sigma_tuned, cos, n_cols: int, tol: float = 1e-6) -> None:
    """The fingerprint covers names, shapes and sizes, not values: compare what was recomputed
    with what the scan stored (tuned sigma, and max|cos| wherever the best base match lies
    among the columns computed; n_cols = 0 skips that, as for vectors='both' where the stored
    value combines both sides) so that edited weights are caught."""
    stored = layer.sigma_tuned
    for a, b in zip(sigma_tuned, stored):
        if abs(a - b) > tol * max(1.0, abs(b)):
            raise ReportError(f"{name!r}: the checkpoints' weights differ from the scanned ones "
                              f"(tuned sigma {a:.6g} vs {b:.6g} in the report); rescan first")
    row_max = cos.max(dim=1).values.tolist()  # (k,)
    for j, (bi, mc) in enumerate(zip(layer.base_index, layer.max_cos)):
        if j < len(row_max) and bi < n_cols and abs(row_max[j] - mc) > tol:
            raise ReportError(f"{name!r}: the checkpoints' weights differ from the scanned ones "
                              f"(max|cos| of tuned vector {j}: {row_max[j]:.6f} vs {mc:.6f} in the "
                              f"report); rescan first")
