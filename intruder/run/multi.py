"""Several devices: every visible GPU in one process, and torch.distributed across processes.

In one process the pipeline runs worker threads on each device in `resolve_devices` and they take
pairs from one queue, so faster devices take more. Launched by torchrun

    torchrun --nproc-per-node 2 -m intruder scan BASE TUNED -o report.json

each rank scans a share of the matrices (balanced by cost) on cuda:LOCAL_RANK (or the CPU),
the results are all-gathered over a gloo group (a few kilobytes per matrix; no NCCL needed), and
rank 0 alone writes the report. Every matrix is computed by the same code from the same seed
whichever device gets it, so the report equals a single-device run's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .devices import resolve_devices


def dist_context() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def is_primary() -> bool:
    """False on every torchrun rank but 0 (they must not write reports or print them)."""
    ctx = dist_context()
    return ctx is None or ctx[0] == 0


def init_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def done_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def rank_devices(spec: str | None, local_rank: int) -> list[torch.device]:
    """One device per rank: cuda:LOCAL_RANK when CUDA is used, else the CPU."""
    devs = resolve_devices(spec)
    if devs[0].type != "cuda":
        return devs
    if spec not in (None, "", "auto", "cuda"):
        return [devs[local_rank % len(devs)]]
    return [torch.device("cuda", local_rank % torch.cuda.device_count())]


def cost(shape: Sequence[int]) -> float:
    """Relative work of one matrix: Gram products and decompositions scale as m n min(m, n)."""
    if len(shape) != 2:
        return 1.0
    m, n = shape
    return float(m) * n * min(m, n) + 1.0


def shard(shapes: Sequence[Sequence[int]], world: int) -> list[list[int]]:
    """Indices per rank, balanced by cost (longest first onto the least loaded rank); each
    rank's list in ascending order."""
    load = [0.0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(shapes)), key=lambda i: (-cost(shapes[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += cost(shapes[i])
    return [sorted(x) for x in out]


def all_gather(local: list, world: int) -> list:
    """Every rank's list of (index, result or exception), concatenated."""
    import torch.distributed as dist

    got: list = [None] * world
    dist.all_gather_object(got, local)
    out: list = []
    for part in got:
        out.extend(part or [])
    return out
