"""The scan engine: stream layer pairs from disk, decompose on the device, match, summarise.

Reading and merging the next pairs (CPU, a background thread) overlaps with the decomposition of
the current one (device); at most `lookahead` pairs are held in memory, so peak host memory
depends on the largest layer, not on the model.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

import torch

from ..errors import IntruderError, NonFiniteError
from ..types import Intruder, LayerPair, LayerResult, ScanConfig
from .decompose import Spectrum, full_spectrum, spectral_norm, top_spectrum
from .match import counts_by_epsilon, match_vectors


@dataclass
class Loaded:
    """A pair read from disk: base and tuned matrices on the CPU (None when unchanged)."""

    pair: LayerPair
    w0: Optional[torch.Tensor]  # (m, n) stored dtype
    wt: Optional[torch.Tensor]  # (m, n) stored dtype, or float64 for merged LoRA
    status: str  # scanned | unchanged | nonfinite
    dtype: str


def resolve_device(spec: str) -> torch.device:
    """auto -> first CUDA device if present, else CPU."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise IntruderError(f"--device {spec!r}: not a device (use auto, cpu, cuda or cuda:N)")
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
    if not torch.isfinite(w0).all():
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
    if not torch.isfinite(wt).all():
        if not allow_nonfinite:
            where = pair.lora.a.path if pair.lora is not None else pair.tuned.path
            raise NonFiniteError(f"tuned tensor {pair.name!r} in {where} contains NaN or Inf "
                                 f"(use --allow-nonfinite to skip such layers)")
        return Loaded(pair, None, None, "nonfinite", pair.base.dtype)
    if wt.dtype == w0.dtype and torch.equal(wt, w0):
        return Loaded(pair, None, None, "unchanged", pair.base.dtype)
    return Loaded(pair, w0, wt, "scanned", pair.base.dtype)


def analyse(w0: torch.Tensor, wt: torch.Tensor, config: ScanConfig, name: str = "",
            base_spec: Optional[Spectrum] = None) -> Tuple[dict, Spectrum]:
    """Algorithm 1 plus caveat measures on one pair already on its device. Returns (fields,
    base spectrum) where fields are LayerResult keyword arguments."""
    w0 = w0.to(torch.float64)  # (m, n)
    wt = wt.to(torch.float64)  # (m, n)
    k = min(config.top_k, min(w0.shape))
    left = config.vectors in ("left", "both")
    right = config.vectors in ("right", "both")
    b = base_spec if base_spec is not None else full_spectrum(w0, left=left, right=right)
    t = top_spectrum(wt, k, left=left, right=right)
    top_r = 2 * k
    ml = match_vectors(t.u, t.sigma, b.u, b.sigma, config.near_window, top_r) if left else None
    mr = match_vectors(t.v, t.sigma, b.v, b.sigma, config.near_window, top_r) if right else None
    # decision vector: left, right, or both sides below epsilon (the component u v^T is new)
    if config.vectors == "both":
        decide = torch.maximum(ml.max_cos, mr.max_cos)
    else:
        decide = (ml or mr).max_cos
    prime = ml or mr
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
            in_cluster=in_cluster))
    energy = float(sig_t[flags].square().sum()) / energy_total if energy_total > 0 else 0.0
    sig_k = float(b.sigma[k - 1]) if b.sigma.numel() >= k else float("nan")
    d = wt - w0  # (m, n)
    dnorm = spectral_norm(d)
    fields = dict(
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
        method=f"{b.method}/{t.method}",
    )
    from .margin import margin_fields  # margin + update-shape measures (issue 9), extra pairs

    fields["extra"] = tuple(fields.get("extra", ())) + margin_fields(
        b, t, w0, wt, d, k, decide, eps, dnorm, left=left)
    return fields, b


def scan_pairs(pairs: Iterable[LayerPair], read: Callable, config: ScanConfig,
               progress: bool = False, lookahead: int = 2,
               base_cache=None) -> Iterator[LayerResult]:
    """Yield one LayerResult per pair, in order, overlapping disk reads with device compute."""
    device = resolve_device(config.device)
    pairs = list(pairs)
    bar = _bar(len(pairs), progress)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="intruder-read") as pool:
        futures: List = []
        it = iter(pairs)

        def submit_next():
            p = next(it, None)
            if p is not None:
                futures.append(pool.submit(load_pair, p, read, config.allow_nonfinite))

        for _ in range(max(1, lookahead)):
            submit_next()
        while futures:
            fut = futures.pop(0)
            loaded = fut.result()
            submit_next()
            t0 = time.perf_counter()
            yield _result(loaded, config, device, base_cache, t0)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


def _result(loaded: Loaded, config: ScanConfig, device, base_cache, t0) -> LayerResult:
    p = loaded.pair
    shape = tuple(p.base.shape)
    if loaded.status != "scanned":
        return LayerResult(name=p.name, shape=shape, dtype=loaded.dtype, status=loaded.status)
    w0 = loaded.w0.to(device)
    wt = loaded.wt.to(device)
    spec = base_cache.get(p, loaded.w0, config) if base_cache is not None else None
    fields, spec_used = analyse(w0, wt, config, p.name, base_spec=spec)
    if base_cache is not None and spec is None:
        base_cache.put(p, loaded.w0, config, spec_used)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LayerResult(name=p.name, shape=shape, dtype=loaded.dtype, status="scanned",
                       seconds=time.perf_counter() - t0, **fields)


def _bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="matrix", desc="scanning", leave=False, dynamic_ncols=True)
