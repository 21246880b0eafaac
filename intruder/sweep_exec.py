"""Running an alpha sweep's evaluations in memory, on one device or several.

The work is a list of jobs: the base model, then one job per alpha (alpha = 1 is the tuned
model). A worker owns one device (a GPU, or the CPU); it loads the tuned model once, builds an
InPlaceRescaler on it and, per alpha job, sets the alpha in place and runs every evaluator. The
base job loads the base model, evaluates it and frees it before the tuned model is loaded, so a
worker never holds two models.

* one worker: in this process;
* N workers (N GPUs, or N CPU processes for testing): N spawned processes, worker i taking jobs
  i, i + N, ... (`assign`); results come back through a queue, in job order whatever finished
  first, so the sweep's numbers do not depend on N;
* torchrun: each rank is one worker on cuda:LOCAL_RANK (or the CPU) with the same assignment,
  and rank 0 gathers the results (torch.distributed, gloo);
* sharded: one worker whose model is spread over every visible GPU (device_map="auto"), for a
  model larger than one GPU.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, cast

from .adapter_merge import AdapterMerge
from .errors import IntruderError
from .evaluate import LoadedModel, get_evaluator, load_model, run_evaluators
from .inplace import InPlaceRescaler
from .intervene import LayerChange, select_intruders
from .io import open_checkpoint
from .types import EvalResult, ScanReport


@dataclass(frozen=True)
class SweepSpec:
    """What every worker needs (picklable: evaluators are rebuilt from their specs)."""

    report: ScanReport
    base_path: str
    model_path: str  # the tuned model to load (an adapter's merged copy)
    evals: tuple[str, ...]
    epsilon: float | None = None
    eval_options: tuple[tuple[str, object], ...] = ()
    model_config: str | None = None
    dtype: str | None = None
    max_length: int | None = None
    limit: int | None = None
    storage_dtypes: tuple[tuple[str, str], ...] = ()  # report layer -> torch dtype name
    shard: bool = False  # device_map="auto" over every visible GPU
    adapter_path: str | None = None  # a PEFT adapter TUNED (model_path is its merged copy)


@dataclass(frozen=True)
class Job:
    kind: str  # base | alpha
    alpha: float | None = None


@dataclass(frozen=True)
class JobResult:
    job: Job
    results: tuple[EvalResult, ...]
    changes: tuple[LayerChange, ...] = ()
    warnings: tuple[str, ...] = ()
    rescale_seconds: float = 0.0  # set_alpha, synchronised
    eval_seconds: float = 0.0  # every evaluator, one pass
    load_seconds: float = 0.0  # model load (+ rescaler set-up) charged to this job
    device: str = ""
    worker: int = 0


@dataclass(frozen=True)
class WorkerStats:
    worker: int
    device: str
    peak_gpu_bytes: tuple[int, ...] = ()  # torch.cuda.max_memory_allocated per visible GPU used
    peak_host_bytes: int = 0  # ru_maxrss of the worker process
    kept_bytes: int = 0  # original weights the rescaler keeps


@dataclass
class SweepRun:
    results: list[JobResult] = field(default_factory=list)
    stats: list[WorkerStats] = field(default_factory=list)


def assign(jobs: Sequence[Job], n_workers: int) -> list[list[Job]]:
    """Worker i takes jobs i, i + n, i + 2n, ... (deterministic, so reruns split the same way)."""
    return [list(jobs[i::n_workers]) for i in range(max(1, n_workers))]


def make_jobs(alphas: Sequence[float], base: bool = True) -> list[Job]:
    jobs = [Job("base")] if base else []
    return jobs + [Job("alpha", float(a)) for a in alphas]


class Worker:
    """One device, one tuned model, many alphas."""

    def __init__(self, spec: SweepSpec, device: str, index: int = 0,
                 log: Callable[[str], None] = lambda m: None, progress: bool = False):
        self.spec, self.device, self.index, self.log = spec, device, index, log
        self.progress = progress
        opts = dict(spec.eval_options)
        self.evaluators = [get_evaluator(s, **opts) for s in spec.evals]
        self.lm: LoadedModel | None = None
        self.rescaler: InPlaceRescaler | None = None

    def _load(self, path: str) -> LoadedModel:
        return load_model(path, model_config=self.spec.model_config, device=self.device,
                          dtype=self.spec.dtype, max_length=self.spec.max_length,
                          progress=self.progress, device_map="auto" if self.spec.shard else None)

    def _evaluate(self, lm: LoadedModel) -> tuple[tuple[EvalResult, ...], float]:
        _sync(lm.device)
        t0 = time.perf_counter()
        res = run_evaluators(lm, self.evaluators, limit=self.spec.limit, progress=self.progress)
        _sync(lm.device)
        return tuple(res), time.perf_counter() - t0

    def run(self, job: Job) -> JobResult:
        if job.kind == "base":
            t0 = time.perf_counter()
            self.log(f"evaluating base: {self.spec.base_path}")
            base_lm = self._load(self.spec.base_path)
            load = time.perf_counter() - t0
            res, sec = self._evaluate(base_lm)
            del base_lm
            _free()
            return JobResult(job, res, eval_seconds=sec, load_seconds=load, device=self.device,
                             worker=self.index)
        if job.alpha is None:
            raise IntruderError(f"an alpha job without an alpha: {job}")
        load = 0.0
        lm, rescaler = self.lm, self.rescaler
        if lm is None or rescaler is None:
            import torch

            t0 = time.perf_counter()
            self.log(f"loading the tuned model once: {self.spec.model_path}")
            self.lm = lm = self._load(self.spec.model_path)
            dts = {k: getattr(torch, v) for k, v in self.spec.storage_dtypes}
            exact = None
            if self.spec.adapter_path:  # start from the float64 merge, as the writer does
                exact = AdapterMerge(open_checkpoint(self.spec.base_path, allow_adapter=False),
                                     open_checkpoint(self.spec.adapter_path),
                                     select_intruders(self.spec.report, self.spec.epsilon)).exact
            self.rescaler = rescaler = InPlaceRescaler(
                lm.model, self.spec.report, epsilon=self.spec.epsilon, storage_dtypes=dts,
                exact=exact)
            load = time.perf_counter() - t0
        _sync(lm.device)
        t0 = time.perf_counter()
        changes = rescaler.set_alpha(job.alpha)
        _sync(lm.device)
        rsec = time.perf_counter() - t0
        self.log(f"evaluating alpha = {job.alpha:g} in memory ({len(changes)} matrices "
                 f"rescaled in {rsec:.2f} s)")
        res, sec = self._evaluate(lm)
        return JobResult(job, res, changes, rescaler.warnings, rsec, sec, load,
                         self.device, self.index)

    def close(self) -> WorkerStats:
        kept = self.rescaler.kept_bytes if self.rescaler is not None else 0
        if self.rescaler is not None:
            self.rescaler.restore()
        return WorkerStats(self.index, self.device, _peak_gpu(), _peak_host(), kept)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _peak_gpu() -> tuple[int, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))


def _peak_host() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


def run_jobs(spec: SweepSpec, jobs: Sequence[Job], devices: Sequence[str],
             log: Callable[[str], None] = lambda m: None, progress: bool = False) -> SweepRun:
    """Run `jobs` over workers on `devices` (one process each when more than one)."""
    if not devices:
        raise IntruderError("no device to evaluate on")
    if len(devices) == 1:
        w = Worker(spec, devices[0], 0, log, progress)
        out = SweepRun([w.run(j) for j in jobs])
        out.stats.append(w.close())
        return out
    return _run_processes(spec, jobs, devices, log)


def _worker_main(spec, device, index, jobs, queue, n_workers) -> None:  # a spawned process
    try:
        if device.startswith("cuda:"):  # this process sees its own GPU only, as cuda:0
            os.environ["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
            device = "cuda:0"
        else:  # CPU workers share the cores
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // n_workers))
        w = Worker(spec, device, index, lambda m: queue.put(("log", index, m)), False)
        for j in jobs:
            queue.put(("result", index, w.run(j)))
        queue.put(("done", index, w.close()))
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, which raises)
        msg = str(exc).strip().splitlines()
        queue.put(("error", index, f"{type(exc).__name__}: {msg[0] if msg else ''}"))


def _run_processes(spec, jobs, devices, log) -> SweepRun:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    parts = assign(jobs, len(devices))
    procs = []
    for i, (dev, part) in enumerate(zip(devices, parts)):
        if not part:
            continue
        p = ctx.Process(target=_worker_main, args=(spec, dev, i, part, queue, len(devices)), daemon=True)
        p.start()
        procs.append(p)
    log(f"{len(procs)} workers ({', '.join(devices[:len(procs)])}), {len(jobs)} evaluations")
    out = SweepRun()
    done, error = 0, None
    try:
        while done < len(procs):
            try:
                kind, idx, payload = queue.get(timeout=5)
            except Exception:  # queue.Empty: check that every worker is still alive
                if any(p.exitcode not in (None, 0) for p in procs) and error is None:
                    error = "a worker process died (out of memory?)"
                    break
                continue
            if kind == "log":
                log(f"[worker {idx} {devices[idx]}] {payload}")
            elif kind == "result":
                out.results.append(payload)
            elif kind == "done":
                out.stats.append(payload)
                done += 1
            else:
                error = f"worker {idx} ({devices[idx]}): {payload}"
                break
    finally:
        for p in procs:
            if error is not None and p.is_alive():
                p.terminate()
            p.join(timeout=60)
    if error is not None:
        raise IntruderError(error)
    order = {j: i for i, j in enumerate(jobs)}
    out.results.sort(key=lambda r: order[r.job])
    out.stats.sort(key=lambda s: s.worker)
    return out


# ---------------------------------------------------------------------------------- torchrun


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def run_jobs_torchrun(spec: SweepSpec, jobs: Sequence[Job], device: str,
                      log: Callable[[str], None] = lambda m: None) -> SweepRun | None:
    """This rank's share of `jobs`; rank 0 returns everyone's results, other ranks None."""
    import torch.distributed as dist

    rank, world, local = distributed()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dev = device
    if device.startswith("cuda"):
        dev = f"cuda:{local}"
    w = Worker(spec, dev, rank, (lambda m: log(f"[rank {rank} {dev}] {m}")), False)
    mine = [w.run(j) for j in assign(jobs, world)[rank]]
    stats = w.close()
    gathered: list[object] = [None] * world if rank == 0 else []
    dist.gather_object((mine, stats), gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    out = SweepRun()
    for item in gathered:  # one (results, stats) pair per rank
        part, st = cast(tuple[list[JobResult], WorkerStats], item)
        out.results.extend(part)
        out.stats.append(st)
    order = {j: i for i, j in enumerate(jobs)}
    out.results.sort(key=lambda r: order[r.job])
    return out


def peak_summary(stats: Sequence[WorkerStats]) -> dict[str, object]:
    """Peak memory per worker, as JSON-ready numbers (bytes)."""
    return {"workers": [{"worker": s.worker, "device": s.device,
                         "peak_gpu_bytes": list(s.peak_gpu_bytes),
                         "peak_host_bytes": s.peak_host_bytes,
                         "kept_original_bytes": s.kept_bytes} for s in stats]}
