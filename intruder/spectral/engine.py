"""Algorithm 1 on one matrix pair: decompose, match, certify, summarise.

`analyse` runs it on one pair already on its device: the base's top eigenpairs (certified, or
all of them), the tuned top-k (certified, warm-started from the base's), the matching, and a
proof that the kept base vectors give the same answer as all of them (certify.py), widening or
completing the base when they might not. Streaming a whole checkpoint through it (readers,
devices, threads, torchrun, the base cache) is the runtime's job: intruder/run/.
"""

from __future__ import annotations

import zlib
from dataclasses import replace

import torch

from .. import settings
from ..types import Analysis, Intruder, ScanConfig
from . import slices
from .certify import TAIL, certify_side, kept_bounds, slice_decisions
from .decompose import Spectrum, spectrum_of
from .margin import margin_measures, update_spectrum
from .match import Match, counts_by_epsilon, match_vectors
from .partial import Eig, eig_full, eig_top, eig_top_lapack, gram, gram_error, gram_side
from .scaling import analyse_scaled

# Gram sizes up to these take the exact path outright (measured: bench/NOTES.md)
EXACT_DIM_CUDA = 256
EXACT_DIM_CPU = 256
BASE_R0 = 32  # base eigenpairs kept at first; doubled while the certificate asks for more
# Gram sizes from this up may prove intruders by spectral slices (slices.py) instead of the
# complete base; below it the complete float64 eigh is as cheap
SLICE_MIN_DIM = 768
# On a CPU both sides come from LAPACK on an index range (dsyevr) rather than Chebyshev
# iteration (the GPU route); tests switch this off to run the GPU route on a CPU.
LAPACK_ON_CPU = True


def _lapack(device) -> bool:
    return torch.device(device).type == "cpu" and LAPACK_ON_CPU


def exact_dim(device) -> int:
    """Largest Gram size that takes the exact path outright (full eigh is cheap there)."""
    env = settings.exact_dim()
    if env is not None:
        return env
    return EXACT_DIM_CUDA if torch.device(device).type == "cuda" else EXACT_DIM_CPU


def _seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8", "replace"))


def _as_eig(spec, w0: torch.Tensor) -> Eig | None:
    """A cached / passed base spectrum as Eig on w0's device (None when unusable)."""
    if spec is None:
        return None
    if isinstance(spec, Eig):
        if spec.side != gram_side(w0.shape) or spec.vecs.shape[0] != min(w0.shape):
            return None
        return spec.to(w0.device)
    if isinstance(spec, Spectrum) and spec.complete:  # a full spectrum from elsewhere
        side = gram_side(w0.shape)
        vecs = spec.u if side == "left" else spec.v
        if vecs is None:
            return None
        other = spec.v if side == "left" else spec.u
        return Eig(spec.sigma.square().to(w0.device), vecs.to(w0.device),
                   torch.zeros(spec.sigma.numel(), dtype=torch.float64), 0.0, True, side,
                   spec.method, None if other is None else other.to(w0.device))
    return None


class _Grams:
    """The base's and the tuned matrix's Gram matrices, each computed at most once per pair
    (the first try, a widened or complete base, a restarted tuned side all use the same one)."""

    def __init__(self, w0: torch.Tensor, wt: torch.Tensor):
        self.w = {"base": w0, "tuned": wt}
        self.g: dict = {}

    def __call__(self, which: str) -> torch.Tensor:
        if which not in self.g:
            w = self.w[which]
            self.g[which] = gram(w, gram_side(w.shape))  # (d, d) float64
        return self.g[which]


def base_eig(w0: torch.Tensor, want: int, start: torch.Tensor | None = None,
             seed: int = 0, fast: bool = True, g: torch.Tensor | None = None) -> Eig:
    """Top-`want` certified base eigenpairs (fast path) or the complete exact spectrum.
    g: gram(w0, side) when the caller has it."""
    side = gram_side(w0.shape)
    if g is None:
        g = gram(w0, side)  # (d, d)
    if fast:
        if _lapack(g.device):  # LAPACK on an index range beats iterating on a CPU
            e = eig_top_lapack(g, want, eps_g=gram_error(w0, g), side=side)
        else:
            e = eig_top(g, want, start=start, seed=seed, eps_g=gram_error(w0, g), side=side)
        if e is not None:
            return e
    return eig_full(w0, side, g=g)


def tuned_eig(wt: torch.Tensor, k: int, start: torch.Tensor | None = None,
              seed: int = 0, fast: bool = True, g: torch.Tensor | None = None) -> Eig:
    """Certified top-k tuned eigenpairs, warm-started from the base's top vectors; exact
    fallback (top-k of the full decomposition). g: gram(wt, side) when the caller has it."""
    side = gram_side(wt.shape)
    if g is None:
        g = gram(wt, side)  # (d, d)
    if fast:
        if _lapack(g.device):  # LAPACK on an index range: no start, no iterations
            e = eig_top_lapack(g, k, eps_g=gram_error(wt, g), side=side)
        else:
            e = eig_top(g, k, start=start, seed=seed + 1, eps_g=gram_error(wt, g), side=side)
        if e is not None:
            return e
    full = eig_full(wt, side, check_upto=k, g=g)
    return Eig(full.vals[:k], full.vecs[:, :k], full.err[:k], float(full.vals[k]) if
               full.r > k else 0.0, full.r <= k, side, full.method,
               None if full.other is None else full.other[:, :k])


def analyse(w0: torch.Tensor, wt: torch.Tensor, config: ScanConfig, name: str = "",
            base_spec=None, scratch: dict | None = None,
            noise: float | None = None) -> tuple[Analysis, Eig]:
    """Algorithm 1 plus caveat measures on one pair already on its device. Returns (analysis,
    base spectrum): the analysis (Analysis.layer makes the LayerResult) and the base spectrum (an
    Eig, what the base cache stores), which can be passed back as base_spec for the same base.
    scratch: a dict kept across calls with the same base (a fleet), for base-only work.
    noise: rms rounding error quantized storage put into Wt - W0 (run/stream.py: storage_noise).
    Float64 weights whose squares leave float64's range are scanned scaled by an exact power
    of two (scaling.py)."""
    return analyse_scaled(_analyse, w0, wt, config, name, base_spec, scratch, noise)


def _analyse(w0: torch.Tensor, wt: torch.Tensor, config: ScanConfig, name: str,
             base_spec, scratch: dict | None, noise: float | None) -> tuple[Analysis, Eig]:
    stored = (w0, wt)  # as read: their dtypes name the storage grid (margin measures)
    w0 = w0.to(torch.float64)  # (m, n)
    wt = wt.to(torch.float64)  # (m, n)
    k = min(config.top_k, min(w0.shape))
    left = config.vectors in ("left", "both")
    right = config.vectors in ("right", "both")
    dim = min(w0.shape)
    fast = dim > exact_dim(w0.device)
    top_r = 2 * k
    seed = _seed(name)
    be = _as_eig(base_spec, w0)
    want = max(BASE_R0, top_r, k + 5)
    grams = _Grams(w0, wt)
    # On a CPU both sides come from LAPACK (no start block), so the tuned side is computed
    # first and once, and tells whether the base will have to be complete (_looks_new)
    lapack = _lapack(w0.device)
    # W0^T u (left) or W0 v (right) of the tuned top-k, once t is final: read by _looks_new and
    # by _other_side_sim (the same product)
    under = None
    if lapack:
        te = tuned_eig(wt, k, seed=seed, fast=fast, g=grams("tuned"))
        t = spectrum_of(wt, te, left, right, upto=k)
        if be is None:
            complete = False
            if fast and dim < slice_min_dim():
                under = _under_base(w0, t.vecs(left), left)
                complete = _looks_new(under, t.sigma)
            be = base_eig(w0, want, seed=seed, fast=fast and not complete, g=grams("base"))
    else:
        if be is None:
            be = base_eig(w0, want, seed=seed, fast=fast, g=grams("base"))
        te = tuned_eig(wt, k, start=be.vecs[:, : k + 8], seed=seed, fast=fast,
                       g=grams("tuned"))
        t = spectrum_of(wt, te, left, right, upto=k)
    bound = None  # (k,) bool: max_cos is a certified upper bound (spectral slices), not exact
    while True:
        # a complete base on the other side than its Gram's: its vectors (W0 V0 / sigma, a
        # (d_other, d) product) are derived only as far as the measures read them; the match
        # takes its |cos| through the Gram side (_other_side_sim)
        lazy = be.complete and be.other is None and left != right and \
            (be.side == "right") == left
        b = spectrum_of(w0, be, left, right, other_upto=max(top_r, k + 5) if lazy else None)
        sim = None
        if lazy:
            if under is None:
                under = _under_base(w0, t.vecs(left), left)
            sim = _other_side_sim(be, under)
        ml = match_vectors(t.vecs(True), t.sigma, b.vecs(True), b.sigma, config.near_window,
                           top_r, sim=sim) if left else None
        mr = match_vectors(t.vecs(False), t.sigma, b.vecs(False), b.sigma, config.near_window,
                           top_r, sim=sim) if right else None
        why = ""
        for on, is_left, terr, berr in ((left, True, t.err_u, b.err_u),
                                        (right, False, t.err_v, b.err_v)):
            if on and not why:
                why = certify_side(t.vecs(is_left), t.sigma, terr, b.vecs(is_left), berr, b.rest,
                                   b.complete, dim, config.near_window, top_r, k)
        if not why:
            break
        want = 2 * be.r  # widen the kept base spectrum, then complete it
        widen = not why.startswith("full") and 2 * (want + want // 2) < dim
        if why.endswith(TAIL) and not widen and config.vectors != "both" and fast and \
                dim >= slice_min_dim():
            got = _slices(w0, be, t, b, left, k, config.epsilons, scratch, grams)
            if got is not None:
                value, bound = got
                prime = _primary(ml, mr)
                prime = replace(prime, max_cos=value.to(prime.max_cos.device, torch.float64))
                ml, mr = (prime, None) if left else (None, prime)
                break
        be = base_eig(w0, want, start=be.vecs, seed=seed, fast=fast and widen, g=grams("base"))
        if lapack:
            continue
        # the tuned side restarts from the final base, as a warm scan (base from the cache)
        # will: cold and warm scans run the same computation on the same arrays (equal to the
        # bit where the BLAS is deterministic; to rounding, same decisions, on any)
        te = tuned_eig(wt, k, start=be.vecs[:, : k + 8], seed=seed, fast=fast,
                       g=grams("tuned"))
        t = spectrum_of(wt, te, left, right, upto=k)
        under = None
    del grams  # (d, d) each: not needed by the measures below
    # decision vector: left, right, or both sides below epsilon (the component u v^T is new)
    prime = _primary(ml, mr)
    if ml is not None and mr is not None:  # vectors == "both"
        decide = torch.maximum(ml.max_cos, mr.max_cos)
    else:
        decide = prime.max_cos
    eps = config.epsilon
    sig_t = t.sigma.cpu()
    flags = (decide < eps).cpu()
    energy_total = float(sig_t.square().sum())
    intruders = []
    for j in torch.nonzero(flags).flatten().tolist():
        in_cluster = bool(prime.near_size[j] >= 2 and prime.near_overlap[j] >= eps)
        intruders.append(Intruder(
            index=j, sigma=float(sig_t[j]), max_cos=float(decide[j]),
            base_index=int(prime.base_index[j]), side=config.vectors,
            near_overlap=float(prime.near_overlap[j]), top_overlap=float(prime.top_overlap[j]),
            in_cluster=in_cluster, max_cos_bound=bool(bound[j]) if bound is not None else False))
    energy = float(sig_t[flags].square().sum()) / energy_total if energy_total > 0 else 0.0
    sig_k = float(b.sigma[k - 1]) if b.sigma.numel() >= k else float("nan")
    d = wt - w0  # (m, n)
    update = update_spectrum(d, keep_gram=True)  # dW's singular values once: ||dW||_2 here,
    dnorm = update.top  # its shape and (with its Gram) the novel part's norm in margin
    margin, shape = margin_measures(b, t, w0, wt, d, k, decide, eps, dnorm, left=left,
                                    update=update, stored=stored, noise=noise)
    found = Analysis(
        sigma_base=tuple(float(s) for s in b.sigma[: k + 5].cpu()),
        sigma_tuned=tuple(float(s) for s in sig_t),
        max_cos=tuple(float(x) for x in decide.cpu()),
        base_index=tuple(int(x) for x in prime.base_index.cpu()),
        max_cos_right=tuple(float(x) for x in mr.max_cos.cpu()) if mr is not None and ml is not None else (),
        base_index_right=tuple(int(x) for x in mr.base_index.cpu()) if mr is not None and ml is not None else (),
        near_overlap=tuple(float(x) for x in prime.near_overlap.cpu()),
        top_overlap=tuple(float(x) for x in prime.top_overlap.cpu()),
        intruders=tuple(intruders),
        counts_by_epsilon=counts_by_epsilon(decide.cpu(), config.epsilons),
        intruder_energy=energy,
        delta_norm_rel=dnorm / sig_k if sig_k > 0 else float("inf"),
        delta_fro_rel=float(d.norm() / w0.norm()) if float(w0.norm()) > 0 else float("inf"),
        method=_method(be, te, bound is not None),
        max_cos_bound=tuple(bool(x) for x in bound) if bound is not None and bool(bound.any())
        else (),
        margin=margin,
        update_shape=shape,
    )
    return found, be


def _under_base(w0: torch.Tensor, t_vecs: torch.Tensor, left: bool) -> torch.Tensor:
    """W0^T t (n, k) for left tuned vectors t (m, k), W0 t (m, k) for right ones (n, k)."""
    return w0.mT @ t_vecs if left else w0 @ t_vecs


def _other_side_sim(be: Eig, z: torch.Tensor) -> torch.Tensor:
    """|<t_j, b_i>| (k, d) against every base vector b_i of the side opposite be's Gram side, from
    the Gram side's vectors: b_i = W0 v_i / sigma_i (or W0^T u_i / sigma_i), so
    <t_j, b_i> = <W0^T t_j, v_i> / sigma_i: a (k, d) product instead of deriving all d b_i.
    z: _under_base of the tuned vectors t (d, k), which lie on the side opposite be's."""
    sig = be.vals.clamp_min(0).sqrt() / be.scale  # (d,) singular values of W0
    tiny = torch.finfo(torch.float64).tiny
    # same arithmetic as derive_other's W0 v / sigma, taken against t: (z^T V) / sigma
    return ((z.mT @ be.vecs) / sig.clamp_min(tiny)).abs().clamp_max(1.0)  # (k, d)


# A tuned vector keeping less than this share of its energy under the base (||W0^T u||^2 /
# sigma_t^2 for a left vector) is probably new to it: its max|cos| then needs the complete base
NEW_ENERGY = 0.5


def _looks_new(under: torch.Tensor, sigma: torch.Tensor) -> bool:
    """Whether some top-k tuned vector looks new to the base (an intruder in the making), so
    that the base's top eigenpairs alone will not decide it. Only a guess that picks the route
    (top eigenpairs first, or the complete base at once); the certificate decides as always.
    For a vector that matches a base vector, ||W0^T u||^2 is about sigma_t^2; for a new
    direction it is about ||W0||_F^2 / d, far below the top-k's sigma^2.
    under: _under_base of the tuned top-k vectors, (n, k) or (m, k); sigma: their (k,) values."""
    seen = torch.linalg.vector_norm(under, dim=0).square().cpu()  # (k,)
    want = sigma.cpu().square() * NEW_ENERGY  # (k,)
    return bool((seen < want).any())


def _primary(ml: Match | None, mr: Match | None) -> Match:
    """The match whose overlaps and base indices are reported: the left side's when matched."""
    prime = ml if ml is not None else mr
    if prime is None:
        raise ValueError("neither side was matched (vectors is left, right or both)")
    return prime


def _method(be: Eig, te: Eig, slices: bool = False) -> str:
    base = be.method if be.complete else f"{be.method}[top {be.r}]"
    return f"{base}{'+slices' if slices else ''}/{te.method}"


def slice_min_dim() -> int:
    """Smallest Gram size where spectral slices replace the complete base (INTRUDER_SLICE_MIN_DIM;
    0 disables them)."""
    env = settings.slice_min_dim()
    if env is not None:
        return env if env > 0 else 1 << 62
    return SLICE_MIN_DIM


def _slices(w0, be: Eig, t, b, left: bool, k: int, epsilons, scratch: dict | None = None,
            grams: _Grams | None = None):
    """Spectral-slice certificate for the matched side: (value (k,) CPU, bound (k,) bool) when
    every decision at every epsilon is proved without the complete base, else None."""
    side = "left" if left else "right"
    tv, terr = (t.u, t.err_u) if left else (t.v, t.err_v)
    bv, berr = (b.u, b.err_u) if left else (b.v, b.err_v)
    inv = None
    if scratch is not None:  # the base's inverse Gram, once per base in a fleet
        key = ("inverse_gram", be.side)
        if key not in scratch:
            scratch[key] = slices.inverse_gram(w0, be.side, g=grams("base") if grams else None)
        inv = scratch[key]
        if inv is None:
            return None
    elif grams is not None:
        inv = slices.inverse_gram(w0, be.side, g=grams("base"))
        if inv is None:
            return None
    out = slices.leftout_bound(w0, be, tv[:, :k], terr, side, inv=inv)
    if out is None:
        return None
    best, e, _, _ = kept_bounds(tv, terr, bv, berr, k)
    return slice_decisions(best, e, out, epsilons)
