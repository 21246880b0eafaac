"""The scan engine: decompose each pair on its device, match, summarise.

`analyse` runs Algorithm 1 on one pair: the base's top eigenpairs (certified, or all of them),
the tuned top-k (certified, warm-started from the base's), the matching, and a proof that the
kept base vectors give the same answer as all of them (certify.py), widening or completing the
base when they might not. `scan_pairs` streams a whole checkpoint through it (stream.py: parallel
readers, CUDA streams, several GPUs; multi.py: torchrun).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Callable, TypeVar, overload

import torch

from .. import settings
from ..errors import IntruderError, NonFiniteError
from ..types import Analysis, Intruder, LayerPair, LayerResult, ScanConfig
from .certify import TAIL, certify_side, kept_bounds, slice_decisions
from .decompose import Spectrum, spectrum_of
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
_R = TypeVar("_R")  # what a scan_pairs group function returns per item


@dataclass
class Loaded:
    """A pair read from disk: base and tuned matrices on the CPU (None when unchanged)."""

    pair: LayerPair
    w0: torch.Tensor | None  # (m, n) stored dtype
    wt: torch.Tensor | None  # (m, n) stored dtype, or float64 for merged LoRA
    status: str  # scanned | unchanged | nonfinite
    dtype: str


def resolve_device(spec: str) -> torch.device:
    """auto -> first CUDA device if present, else CPU."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise IntruderError(f"--device {spec!r}: not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise IntruderError(f"--device {spec}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise IntruderError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise IntruderError(f"--device {spec}: only cpu and cuda are supported")
    return dev


def load_pair(pair: LayerPair, read: Callable, allow_nonfinite: bool) -> Loaded:
    """Read base and tuned tensors of one pair; merge LoRA factors; detect unchanged / non-finite."""
    from ..io.adapter import merge_lora

    w0 = read(pair.base)
    if not all_finite(w0):
        if not allow_nonfinite:
            raise NonFiniteError(f"base tensor {pair.name!r} in {pair.base.path} contains NaN or "
                                 f"Inf (use --allow-nonfinite to skip such layers)")
        return Loaded(pair, None, None, "nonfinite", pair.base.dtype)
    if pair.lora is not None:
        wt = merge_lora(w0, pair.lora, read)
    elif pair.tuned == pair.base:
        return Loaded(pair, None, None, "unchanged", pair.base.dtype)
    else:
        wt = read(pair.tuned)
    if not all_finite(wt):
        if not allow_nonfinite:
            raise NonFiniteError(f"tuned tensor {pair.name!r} in {pair.tuned_path} contains NaN or Inf "
                                 f"(use --allow-nonfinite to skip such layers)")
        return Loaded(pair, None, None, "nonfinite", pair.base.dtype)
    if wt.dtype == w0.dtype and torch.equal(wt, w0):
        return Loaded(pair, None, None, "unchanged", pair.base.dtype)
    return Loaded(pair, w0, wt, "scanned", pair.base.dtype)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t: one float64 sum (NaN and Inf propagate through it); only a sum that
    is not finite, which also overflow of huge finite float64 values gives, is checked again
    element by element."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())


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
        if g.device.type == "cpu":  # LAPACK on an index range beats iterating on a CPU
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
    noise: rms rounding error quantized storage put into Wt - W0 (stream.storage_noise).
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
    if be is None:
        be = base_eig(w0, want, seed=seed, fast=fast, g=grams("base"))
    te = tuned_eig(wt, k, start=be.vecs[:, : k + 8], seed=seed, fast=fast, g=grams("tuned"))
    t = spectrum_of(wt, te, left, right, upto=k)
    bound = None  # (k,) bool: max_cos is a certified upper bound (spectral slices), not exact
    while True:
        b = spectrum_of(w0, be, left, right)
        ml = match_vectors(t.vecs(True), t.sigma, b.vecs(True), b.sigma, config.near_window,
                           top_r) if left else None
        mr = match_vectors(t.vecs(False), t.sigma, b.vecs(False), b.sigma, config.near_window,
                           top_r) if right else None
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
        # the tuned side restarts from the final base, as a warm scan (base from the cache)
        # will: cold and warm scans run the same computation on the same arrays (equal to the
        # bit where the BLAS is deterministic; to rounding, same decisions, on any)
        te = tuned_eig(wt, k, start=be.vecs[:, : k + 8], seed=seed, fast=fast,
                       g=grams("tuned"))
        t = spectrum_of(wt, te, left, right, upto=k)
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
    from .margin import margin_measures, update_spectrum  # margin + update-shape measures

    d = wt - w0  # (m, n)
    update = update_spectrum(d)  # dW's singular values, once: ||dW||_2 here, its shape in margin
    dnorm = update[2]
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
    from .slices import inverse_gram, leftout_bound

    side = "left" if left else "right"
    tv, terr = (t.u, t.err_u) if left else (t.v, t.err_v)
    bv, berr = (b.u, b.err_u) if left else (b.v, b.err_v)
    inv = None
    if scratch is not None:  # the base's inverse Gram, once per base in a fleet
        key = ("inverse_gram", be.side)
        if key not in scratch:
            scratch[key] = inverse_gram(w0, be.side, g=grams("base") if grams else None)
        inv = scratch[key]
        if inv is None:
            return None
    elif grams is not None:
        inv = inverse_gram(w0, be.side, g=grams("base"))
        if inv is None:
            return None
    out = leftout_bound(w0, be, tv[:, :k], terr, side, inv=inv)
    if out is None:
        return None
    best, e, _, _ = kept_bounds(tv, terr, bv, berr, k)
    return slice_decisions(best, e, out, epsilons)


@overload
def scan_pairs(pairs: Iterable[LayerPair], read: Callable, config: ScanConfig,
               progress: bool = False, base_cache=None,
               group_fn: None = None) -> Iterator[LayerResult]: ...


@overload
def scan_pairs(pairs: Iterable[tuple[LayerPair, ...]], read: Callable, config: ScanConfig,
               progress: bool = False, base_cache=None,
               group_fn: None = None) -> Iterator[tuple[LayerResult, ...]]: ...


@overload
def scan_pairs(pairs: Iterable[tuple[LayerPair, ...]], read: Callable, config: ScanConfig,
               progress: bool = False, base_cache=None, *,
               group_fn: Callable[..., _R]) -> Iterator[_R]: ...


def scan_pairs(pairs: Iterable[LayerPair | tuple[LayerPair, ...]], read: Callable,
               config: ScanConfig, progress: bool = False, base_cache=None,
               group_fn: Callable | None = None) -> Iterator[Any]:
    """Yield one LayerResult per pair, in order: parallel reads ahead of the devices, several
    CUDA streams per GPU, every visible GPU (intruder/spectral/stream.py, multi.py). Under
    torchrun each rank scans a share and every rank yields all results. Read-ahead is bounded in
    bytes (INTRUDER_HOST_BUDGET_MB). An item may be a tuple of pairs that share one base (a
    fleet of fine-tunes): the base is read and decomposed once, and a tuple of LayerResults
    comes back for it. group_fn: what runs per item on its device instead of stream.compute
    (same arguments; track.py's sequential steps)."""
    from . import multi
    from .stream import Pipeline

    items = list(pairs)
    ctx = multi.dist_context()
    if ctx is None:
        devices = multi.resolve_devices(config.device)
        bar = _bar(len(items), progress)
        try:
            for res in Pipeline(items, read, config, devices, base_cache, group_fn=group_fn):
                if bar is not None:
                    bar.update(1)
                yield res
        finally:
            if bar is not None:
                bar.close()
            if base_cache is not None:
                base_cache.flush()
        return
    rank, world, local = ctx
    multi.init_group()
    devices = multi.rank_devices(config.device, local)
    mine = multi.shard([tuple((p[0] if isinstance(p, tuple) else p).base.shape) for p in items],
                       world)[rank]
    bar = _bar(len(mine), progress and rank == 0)
    local_out = []
    try:
        for i, res in zip(mine, Pipeline([items[i] for i in mine], read, config, devices,
                                         base_cache, group_fn=group_fn)):
            local_out.append((i, res))
            if bar is not None:
                bar.update(1)
    except IntruderError as exc:  # every rank must reach the gather; raised below, in order
        local_out.append((mine[len(local_out)], exc))
    finally:
        if bar is not None:
            bar.close()
        if base_cache is not None:
            base_cache.flush()
    merged = dict(multi.all_gather(local_out, world))
    multi.done_group()
    for i in range(len(items)):
        if i not in merged:  # a rank stopped at an earlier error
            continue
        res = merged[i]
        if isinstance(res, BaseException):
            raise res
        yield res


def _bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="matrix", desc="scanning", leave=False, dynamic_ncols=True)
