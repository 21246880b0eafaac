"""The scan driver: stream pairs through the per-matrix analysis on every device.

`scan_pairs` feeds a checkpoint's pairs to the pipeline (stream.py: parallel readers, CUDA
streams, several GPUs) or, under torchrun, shards them across ranks and gathers the results
(multi.py); spectral/engine.py's `analyse` is what runs on each pair.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Callable, TypeVar, overload

from ..errors import IntruderError
from ..progress import bar as progress_bar
from ..types import LayerPair, LayerResult, ScanConfig
from . import multi
from .devices import resolve_devices
from .stream import Pipeline

_R = TypeVar("_R")  # what a scan_pairs group function returns per item


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
    CUDA streams per GPU, every visible GPU (run/stream.py, run/multi.py). Under
    torchrun each rank scans a share and every rank yields all results. Read-ahead is bounded in
    bytes (INTRUDER_HOST_BUDGET_MB). An item may be a tuple of pairs that share one base (a
    fleet of fine-tunes): the base is read and decomposed once, and a tuple of LayerResults
    comes back for it. group_fn: what runs per item on its device instead of stream.compute
    (same arguments; track.py's sequential steps)."""
    items = list(pairs)
    ctx = multi.dist_context()
    if ctx is None:
        devices = resolve_devices(config.device)
        bar = progress_bar(len(items), "scanning", "matrix", progress)
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
    bar = progress_bar(len(mine), "scanning", "matrix", progress and rank == 0)
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


