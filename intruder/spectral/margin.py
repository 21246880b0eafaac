"""Intruder margin: how close one matrix is to producing intruders, and the shape of its update.

A count at one epsilon is a cliff. These measures say where a layer stands before it falls:

- ``min_max_cos``: the lowest max|cos| among the top-k tuned vectors. It *is* the epsilon at which
  the first intruder would appear, so ``cos_margin = min_max_cos - epsilon`` is negative exactly
  when the layer has an intruder at epsilon.
- ``strength`` (``delta_norm_rel`` of the engine): ||dW||_2 / sigma_k(W0). A concentrated update
  whose direction is new to the base enters the top-k once it outgrows sigma_k, i.e. near 1.
- ``novel_strength``: ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0), the part of the update that points
  outside the base's top-k subspace (only that part can make an intruder).
- ``subspace_cos``: cosine of the largest principal angle between the top-k subspaces of W0 and Wt.
- ``delta_rank`` / ``delta_stable_rank`` / ``delta_sv``: the spectrum of dW itself, its rank above
  the storage rounding floor and the sharpness of the cliff there (LoRA: a cliff at r; full
  fine-tuning: none). `intruder.provenance` reads these.

Everything is float64 on the device the engine already uses; nothing here reads the disk.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import exitcodes
from ..types import Margin, UpdateShape
from .decompose import full_spectrum, spectral_norm, top_spectrum
from .lapack import syevr_top
from .match import match_vectors
from .partial import gram, gram_side
from .sketch import norm_lanczos, sketch_spectrum

# How many singular values of dW are kept in the report (and computed on large matrices).
DELTA_SV_KEEP = 64
# Exact spectrum of dW up to this smaller dimension; randomized (range finder) above.
EXACT_DELTA_MAX = 1024
RANDOMIZED_Q = 128  # singular values estimated by the randomized path
START_BLOCK = 4  # sketch vectors kept to start the Lanczos runs of ||dW||_2 and the novel norm
GRAM_RESOLVE = 1e-6  # Gram eigenvalues resolve singular values down to ~1e-8 sigma_1; keep margin
# A singular value of dW counts toward its rank when above FLOOR_SLACK x the rounding-noise edge.
FLOOR_SLACK = 2.0
# (name, mantissa bits) of storage grids tested, coarsest first; float64 is the fallback
_GRIDS = (("bfloat16", 7), ("float16", 10), ("float32", 23))


CHUNK = 1 << 21  # elements per block in elementwise passes on a CPU (bounds temporaries to ~16 MB)
CHUNK_CUDA = 1 << 26  # on a GPU: few launches, each still within ~0.5 GB
# the cheapest grid a stored dtype guarantees (nothing coarser is tested): bf16 is the coarsest
_STORED_GRID = {torch.bfloat16: ("bfloat16", 7)}


def _row_blocks(w: torch.Tensor):
    chunk = CHUNK_CUDA if w.device.type == "cuda" else CHUNK
    rows = max(1, chunk // max(1, w.shape[-1]))
    for i in range(0, w.shape[0], rows):
        yield w[i:i + rows]


def storage_grid(w: torch.Tensor) -> tuple[str, int]:
    """The coarsest float grid every entry of w lies on: (dtype name, mantissa bits).

    A weight saved in bf16/fp16 and read back as float64 still sits exactly on that grid, so the
    rounding noise a fine-tune's saved weights carry can be read off the values themselves.
    A tensor still in its stored bf16 needs no pass: no grid tested is coarser."""
    if w.dtype in _STORED_GRID:
        return _STORED_GRID[w.dtype]
    top = float(w.abs().max()) if w.numel() else 0.0
    for name, bits in _GRIDS:
        dt = getattr(torch, name)
        if top > torch.finfo(dt).max:
            continue
        if dt == w.dtype or all(torch.equal(blk.to(dt).to(w.dtype), blk) for blk in _row_blocks(w)):
            return name, bits
    return "float64", 52


# (integer view, exponent shift, exponent mask, bias) of the IEEE formats rounding_rms reads
_LAYOUT = {torch.float64: (torch.int64, 52, 0x7FF, 1023), torch.float32: (torch.int32, 23, 0xFF, 127),
           torch.bfloat16: (torch.int16, 7, 0xFF, 127), torch.float16: (torch.int16, 10, 0x1F, 15)}


def rounding_rms(w: torch.Tensor, bits: int) -> float:
    """Root mean square rounding error of storing w on a grid with `bits` mantissa bits.

    Round-to-nearest leaves an error uniform in +-ulp/2 (variance ulp^2/12), ulp = 2^(e - bits)
    for |x| in [2^e, 2^(e+1)): the mean of ulp^2 is a histogram of the exponent fields, read
    from the bits (one integer pass, no logarithms). Zeros and subnormals count at the smallest
    normal exponent (their share of the sum is negligible: ulp^2 of the smallest normal)."""
    if w.numel() == 0:
        return 0.0
    if w.dtype not in _LAYOUT:
        w = w.to(torch.float64)
    view, shift, mask, bias = _LAYOUT[w.dtype]
    counts = torch.zeros(mask + 1, dtype=torch.int64, device=w.device)
    for blk in _row_blocks(w):
        e = (blk.contiguous().view(view) >> shift) & mask  # (rows, n) biased exponents
        counts += torch.bincount(e.reshape(-1), minlength=mask + 1)
    total = 0.0
    for field, c in enumerate(counts.tolist()):
        if c:
            total += c * math.ldexp(1.0, 2 * (max(field, 1) - bias - bits))
    return math.sqrt(total / 12.0 / w.numel())


class Update(NamedTuple):
    """What the update measures need of dW, computed once per layer (update_spectrum)."""

    sv: torch.Tensor  # singular values, descending (all, or the top RANDOMIZED_Q)
    how: str  # gram | randomized
    top: float  # ||dW||_2
    gram: torch.Tensor | None  # (small, small) Gram matrix of dW on the smaller side, if formed
    right: torch.Tensor | None = None  # (n, b) approximate top right singular vectors (sketch)


def delta_singular_values(d: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, str]:
    """Singular values of d (m, n), descending: all of them (eigenvalues of the smaller Gram
    matrix, float64) when min(m, n) <= EXACT_DELTA_MAX, else the top RANDOMIZED_Q by a randomized
    range finder with one power iteration (sketch.py). Gram values below GRAM_RESOLVE x sigma_1
    are noise. Returns (values, how: 'gram' or 'randomized')."""
    sv, how, _, _ = _delta_spectrum(d, seed)
    return sv, how


def _delta_spectrum(d: torch.Tensor, seed: int = 0, keep_gram: bool = False):
    """delta_singular_values, then the Gram matrix when it was formed and keep_gram (else None),
    then the sketch's top right singular vectors (randomized path, else None)."""
    m, n = d.shape
    small = min(m, n)
    if small <= EXACT_DELTA_MAX:
        g = gram(d, gram_side(d.shape))  # (small, small)
        if g.device.type == "cpu":  # LAPACK's dsyevr, values only, without the GIL
            ev = torch.from_numpy(syevr_top(g.numpy(), small, vectors=False)[::-1].copy())
        else:
            ev = torch.linalg.eigvalsh(g).flip(0)  # descending
        return ev.clamp_min(0).sqrt(), "gram", g if keep_gram else None, None
    sv, right = sketch_spectrum(d, min(RANDOMIZED_Q, small), seed=seed, vectors=START_BLOCK)
    return sv, "randomized", None, right


def estimate_rank(sv: torch.Tensor, floor: float, shape) -> tuple[int, float, bool]:
    """(rank above the floor, cliff ratio sv[r-1] / sv[r], whether the cliff was observed).

    The cliff is observed when some computed singular value lies below the floor; otherwise
    the rank is at least len(sv) (randomized path) or full."""
    above = int((sv > floor).sum())
    seen = above < sv.numel()
    if above == 0:
        return 0, float("inf"), seen
    if not seen:
        return above, 1.0, False
    lo = float(sv[above])
    gap = float(sv[above - 1]) / lo if lo > 0 else float("inf")
    return above, gap, True


def spectral_norm_projected(d: torch.Tensor, basis: torch.Tensor | None, left: bool,
                            iters: int = 30, block: int = 4, seed: int = 1,
                            rtol: float = 1e-9, g: torch.Tensor | None = None,
                            start: torch.Tensor | None = None) -> float:
    """||(I - B B^T) d||_2 (left) or ||d (I - B B^T)||_2 (right), basis B (., k) orthonormal, by
    block Lanczos (sketch.norm_lanczos: a lower bound that converges from below).

    g: d's Gram matrix on its smaller side (gram(d, gram_side(d.shape))), when the caller has
    it: then the Lanczos runs on a (small, small) matrix instead of d itself (the square of the
    answer is its largest eigenvalue; rounding in g costs about sqrt(small * u) ||d||_2 of
    absolute accuracy, far below any reported digit). start: (n, b) approximate top right
    singular vectors of d (Update.right) to begin the Lanczos from."""
    if basis is None:
        return float("nan")
    if g is not None:
        return _projected_norm_from_gram(d, basis, left, g, iters, block, seed, rtol)

    def proj(x):  # (I - B B^T) x
        return x - basis @ (basis.mT @ x)

    if left:  # M = P d: x (n, b) -> (m, b)
        fwd, bwd = (lambda x: proj(d @ x)), (lambda y: d.mT @ proj(y))
    else:  # M = d P
        fwd, bwd = (lambda x: d @ proj(x)), (lambda y: proj(d.mT @ y))
    if start is not None and not left:  # M = d P acts on P x
        start = proj(start)
    return norm_lanczos(fwd, bwd, d.shape[1], d.dtype, d.device, block=block, iters=iters,
                        rtol=rtol, seed=seed, start=start)


def _projected_norm_from_gram(d: torch.Tensor, basis: torch.Tensor, left: bool, g: torch.Tensor,
                              iters: int, block: int, seed: int, rtol: float) -> float:
    """spectral_norm_projected through g, the Gram matrix of d on its smaller side."""
    small_left = gram_side(d.shape) == "left"  # g = d d^T (m, m), else d^T d (n, n)
    if left != small_left:
        # the projector acts on the other side of g: one rank-k correction of g
        #   left:  ||P d||^2 = lambda_max(d^T P d) = lambda_max(g - c^T c),  c = B^T d (k, n)
        #   right: ||d P||^2 = lambda_max(d P d^T) = lambda_max(g - c c^T),  c = d B (m, k)
        c = basis.mT @ d if left else d @ basis
        s = g - (c.mT @ c if left else c @ c.mT)  # (small, small)

        def op(x):
            return s @ x
    else:
        # the projector acts on g's own side: ||P d||^2 = lambda_max(P g P) (likewise right)
        def op(x):
            x = x - basis @ (basis.mT @ x)
            y = g @ x
            return y - basis @ (basis.mT @ y)
    lam = norm_lanczos(op, op, g.shape[0], g.dtype, g.device, block=block, iters=iters,
                       rtol=rtol, seed=seed)  # ||S||_2 of the PSD S: its largest eigenvalue
    return math.sqrt(max(lam, 0.0))


def update_spectrum(d: torch.Tensor, keep_gram: bool = False) -> Update:
    """dW's singular values, how they were computed, ||d||_2 (and its Gram matrix, when formed
    and keep_gram), computed once per layer.

    The exact Gram path gives ||d||_2 as its top value; the randomized path's top value is a
    lower bound, so the power iteration's estimate is taken too and the larger kept."""
    sv, how, g, right = _delta_spectrum(d, keep_gram=keep_gram)
    top = float(sv[0]) if sv.numel() else 0.0
    if how != "gram":  # the sketch's top value is a lower bound: refine (a reported measure),
        # from the sketch's top vectors (a few Lanczos steps instead of a cold start's dozens)
        top = max(top, spectral_norm(d, rtol=1e-9, start=right))
    return Update(sv, how, top, g, right)


def _finite(x: float) -> float | None:
    """JSON has no inf / nan: a measure that cannot be computed is None (null)."""
    return x if math.isfinite(x) else None


def margin_measures(b, t, w0: torch.Tensor, wt: torch.Tensor, d: torch.Tensor, k: int,
                    decide: torch.Tensor, epsilon: float, dnorm: float,
                    left: bool = True, update=None, stored=None,
                    noise: float | None = None) -> tuple[Margin, UpdateShape]:
    """Margin and update-shape measures of one layer.

    b: base Spectrum (all vectors), t: tuned top-k Spectrum, w0/wt/d (m, n) float64 on one device,
    decide: (k,) max|cos| that decides intruders, dnorm: ||d||_2, update: update_spectrum(d,
    keep_gram=True) when the caller already has it (else computed here), stored: (w0, wt) as
    read, before the float64 upcast (their dtype spares the storage-grid pass), default
    (w0, wt); noise: rms
    rounding error that quantized storage (FP8 with scales, GGUF, int8) put into dW, which no
    float grid shows (io/dequant.noise_rms), else None."""
    min_cos = float(decide.min()) if decide.numel() else float("nan")
    sig = b.sigma
    sig_k = float(sig[k - 1]) if sig.numel() >= k else float("nan")
    bu = b.u if left else b.v
    tu = t.u if left else t.v
    basis = bu[:, :k] if bu is not None else None  # (m, k) or (n, k)
    if update is None:
        update = update_spectrum(d, keep_gram=True)
    novel = spectral_norm_projected(d, basis, left, g=update.gram, start=update.right)
    subspace = None
    if basis is not None and tu is not None:
        # (k,) cosines of the principal angles; a (k, k) SVD is LAPACK's on the host (on a GPU
        # it would be a chain of small solver kernels)
        pc = torch.linalg.svdvals((basis.mT @ tu[:, :k]).cpu())
        subspace = _finite(float(pc.min().clamp(0.0, 1.0)))
    n0, nt = float(w0.norm()), float(wt.norm())
    # cosine between the weights as vectors: near 1 for any fine-tune, near 0 for unrelated models
    dot = float(torch.dot(w0.reshape(-1), wt.reshape(-1)))  # no (m, n) temporary
    margin = Margin(min_max_cos=_finite(min_cos), cos_margin=_finite(min_cos - epsilon),
                    novel_strength=_finite(novel / sig_k if sig_k > 0 else float("inf")),
                    subspace_cos=subspace,
                    weight_cos=_finite(dot / (n0 * nt)) if n0 > 0 and nt > 0 else None)
    sv, how = update.sv, update.how
    top = max(float(sv[0]) if sv.numel() else 0.0, dnorm)  # ||d||_2 (exact or randomized)
    fro2 = float(torch.linalg.vector_norm(d)) ** 2
    # the coarser storage grid of the two sides sets the rounding noise dW carries
    s0, st = stored if stored is not None else (w0, wt)
    grid, bits = min(storage_grid(st), storage_grid(s0), key=lambda g: g[1])
    m, n = d.shape
    # Marchenko-Pastur edge of an iid noise matrix with the storage rounding's per-entry rms
    rms = rounding_rms(st, bits)
    if noise is not None and noise > rms:
        rms, grid = noise, "quantized"
    floor = FLOOR_SLACK * rms * (math.sqrt(m) + math.sqrt(n))
    floor = max(floor, float(sv[0]) * GRAM_RESOLVE if sv.numel() else 0.0)
    rank, gap, seen = estimate_rank(sv, floor, d.shape)
    # energy left after the top-`rank` directions, in units of the expected rounding energy:
    # about 1 (or less) when dW is rank-`rank` plus rounding noise, large for a dense update
    tail = max(fro2 - float(sv[:rank].square().sum()), 0.0)
    # the noise level the floor stands for (rounding, or the Gram resolution when that is higher)
    e_round = (floor / FLOOR_SLACK / (math.sqrt(m) + math.sqrt(n))) ** 2 * m * n
    keep = sv[:DELTA_SV_KEEP].cpu()
    shape = UpdateShape(
        stable_rank=_finite(fro2 / top ** 2 if top > 0 else 0.0),
        rank=rank, rank_seen=seen, rank_gap=_finite(gap),
        tail_ratio=_finite(tail / e_round) if e_round > 0 else None,
        # first value below the floor against the noise edge: about 1 (or less) when what
        # lies below the floor is rounding noise, near FLOOR_SLACK when the update goes on
        next_edge=_finite(float(sv[rank]) / (floor / FLOOR_SLACK))
        if seen and floor > 0 and rank < sv.numel() else None,
        floor=_finite(floor), grid=grid, sv_method=how, sv=tuple(float(x) for x in keep))
    return margin, shape


def margin_measures_for(w0: torch.Tensor, wt: torch.Tensor,
                        config) -> tuple[Margin, UpdateShape]:
    """margin_measures from the two matrices alone (a separate pass; the engine calls
    margin_measures with what it has already computed)."""
    w0 = w0.to(torch.float64)  # (m, n)
    wt = wt.to(torch.float64)  # (m, n)
    k = min(config.top_k, min(w0.shape))
    left = config.vectors in ("left", "both")
    right = config.vectors in ("right", "both")
    b = full_spectrum(w0, left=left, right=right)
    t = top_spectrum(wt, k, left=left, right=right)
    cos = [match_vectors(t.vecs(True), t.sigma, b.vecs(True), b.sigma).max_cos] if left else []
    if right:
        cos.append(match_vectors(t.vecs(False), t.sigma, b.vecs(False), b.sigma).max_cos)
    decide = torch.maximum(cos[0], cos[1]) if len(cos) == 2 else cos[0]  # (k,)
    d = wt - w0  # (m, n)
    update = update_spectrum(d, keep_gram=True)
    return margin_measures(b, t, w0, wt, d, k, decide, config.epsilon, update.top, left=left,
                           update=update)


def _quantile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


COS_BANDS = (0.0, 0.1, 0.25)  # cos_margin below each: at / near / approaching the cliff
STRENGTH_BANDS = (1.0, 0.5, 0.25)  # novel_strength at least each


def margin_summary(layers, epsilon: float) -> dict:
    """Distribution of the margin measures over scanned layers (the report's summary block)."""
    rows = []
    for l in layers:
        if l.status != "scanned":
            continue
        mg = l.margin
        if mg is None or mg.min_max_cos is None:
            continue
        rows.append((l.name, mg.min_max_cos, mg.novel_strength, l.delta_norm_rel))
    if not rows:
        return {"layers": 0}
    cos = [r[1] for r in rows]
    nov = [(r[2], r[0]) for r in rows if r[2] is not None]
    closest = min(rows, key=lambda r: r[1])
    out = {
        "layers": len(rows),
        "epsilon": epsilon,
        "first_intruder_epsilon": closest[1],
        "cos_margin": closest[1] - epsilon,
        "closest_layer": closest[0],
        "min_max_cos_quantiles": {"min": min(cos), "p10": _quantile(cos, 0.1),
                                  "median": _quantile(cos, 0.5), "max": max(cos)},
        "layers_below_cos_margin": {format(b, "g"): sum(1 for c in cos if c - epsilon < b)
                                    for b in COS_BANDS},
    }
    if nov:
        vals = [v for v, _ in nov]
        top = max(nov)
        out.update({
            "novel_strength_quantiles": {"median": _quantile(vals, 0.5),
                                         "p90": _quantile(vals, 0.9), "max": top[0]},
            "strongest_layer": top[1],
            "layers_novel_strength_at_least": {format(b, "g"): sum(1 for v in vals if v >= b)
                                               for b in STRENGTH_BANDS},
        })
    return out


def margin_line(m: dict) -> str:
    """Two lines for the terminal table: where the first intruder would appear, and how strong
    the novel part of the update is against the base's k-th singular value."""
    if not m or not m.get("layers"):
        return "margin: n/a (no scanned matrices with margin measures)"
    eps = m["epsilon"]
    s = (f"margin: first intruder at epsilon {m['first_intruder_epsilon']:.3f} (lowest max|cos|, "
         f"{m['closest_layer']}), {m['cos_margin']:+.3f} from epsilon {eps:g}; median over "
         f"matrices {m['min_max_cos_quantiles']['median']:.3f}")
    q = m.get("novel_strength_quantiles")
    if q:
        s += (f"\n        novel strength ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0): median "
              f"{q['median']:.3f}, max {q['max']:.3f} ({m['strongest_layer']}); a new direction "
              f"enters the top-k near 1; matrices >= 0.5: "
              f"{m['layers_novel_strength_at_least']['0.5']}")
    return s


EXIT_INTRUDERS = exitcodes.INTRUDERS  # --fail-on-intruders
EXIT_MARGIN = exitcodes.MARGIN  # --fail-on-margin / --fail-on-strength


def margin_breaches(layers, epsilon: float, cos_within: float | None = None,
                    strength_at_least: float | None = None):
    """Names of scanned matrices whose lowest max|cos| lies within `cos_within` of epsilon
    (min_max_cos < epsilon + cos_within) or whose novel strength is at least `strength_at_least`."""
    out = []
    for l in layers:
        if l.status != "scanned":
            continue
        if l.margin is None:
            continue
        c, s = l.margin.min_max_cos, l.margin.novel_strength
        if cos_within is not None and c is not None and c - epsilon < cos_within:
            out.append(l.name)
        elif strength_at_least is not None and s is not None and s >= strength_at_least:
            out.append(l.name)
    return out


def fail_code(reports, fail_on_intruders: bool = False, fail_on_margin: float | None = None,
              fail_on_strength: float | None = None) -> int:
    """Exit code of an audit gate over scan reports: 3 intruders (when asked), else 4 when a
    matrix is inside the margin, else 0."""
    if fail_on_intruders and any(l.intruders for r in reports for l in r.layers):
        return EXIT_INTRUDERS
    if fail_on_margin is not None or fail_on_strength is not None:
        for r in reports:
            if margin_breaches(r.layers, r.config.epsilon, fail_on_margin, fail_on_strength):
                return EXIT_MARGIN
    return 0
