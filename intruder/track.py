"""Many checkpoints of one base: continual-learning tracks and side-by-side comparisons.

    run_track(base, [step1, step2, step3])     # sequential fine-tunes (each from the previous)
    run_compare(base, [ft_a, ft_b, adapter_c])  # independent fine-tunes of one base

Both run on the scan's streaming pipeline (run/stream.py), layer-major: per matrix one group
of the base and every checkpoint's tensor, read while the devices work on earlier groups; the
base is copied and decomposed once (or taken from the base spectral cache) and every checkpoint
is measured against it; torchrun splits the groups across processes. A track also measures each step
against the previous one (that step's own full decomposition) and follows intruders along the
sequence: an intruder of step i *persists* when it matches (|cos| >= PERSIST_COS) an intruder of
step i-1, is *new* otherwise, and an intruder of step i-1 matched by none of step i is *gone*.

A PEFT adapter as a track step is applied to the previous step's weights (the continual-learning
chain base -> +adapter1 -> +adapter2); in a comparison it is applied to the base.

Each checkpoint gets ordinary ScanReports (vs base, and vs previous in a track), so the scan's
summary, margin, provenance verdict and JSON schema all apply to it unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeAlias

import torch

from . import __version__
from .errors import IntruderError
from .io import identity, open_checkpoint, pair_checkpoints, read_ref
from .io.adapter import merge_lora
from .io.basecheck import chain_checks, warning_text
from .io.dequant import noise_rms
from .provenance import provenance
from .report.schema import SCHEMA_VERSION
from .report.schema import to_dict as scan_dict
from .report.summary import summary
from .report.verdict import decide
from .report.verdict import to_dict as verdict_dict
from .run import stream
from .run.cache import BaseCache
from .run.devices import resolve_device
from .run.driver import scan_pairs
from .run.load import tuned_status
from .run.stream import Raw
from .scan import derivation_warnings, validate_config
from .spectral.decompose import top_spectrum
from .spectral.engine import analyse
from .types import Analysis, CheckpointInfo, LayerResult, LoraInfo, ScanConfig, ScanReport, TensorRef

PERSIST_COS = 0.5  # an intruder matches one of the previous step when |cos| >= this
TRACK_SCHEMA_VERSION = "1.0"


@dataclass(frozen=True)
class Persistence:
    """Intruders (vs base) of one matrix at one step, followed from the previous step."""

    persistent: tuple[int, ...] = ()  # tuned ranks of intruders also present at the step before
    new: tuple[int, ...] = ()  # tuned ranks of intruders that are new at this step
    gone: tuple[int, ...] = ()  # ranks (at the previous step) of intruders no longer present
    match_cos: tuple[float, ...] = ()  # per persistent intruder: |cos| to its predecessor


@dataclass(frozen=True)
class TrackEntry:
    label: str
    path: str
    vs_base: ScanReport
    vs_previous: ScanReport | None = None  # track mode, steps after the first
    persistence: dict[str, Persistence] = field(default_factory=dict)  # track mode


@dataclass(frozen=True)
class TrackReport:
    mode: str  # track | compare
    base: CheckpointInfo
    config: ScanConfig
    entries: tuple[TrackEntry, ...]
    seconds: float = 0.0
    device: str = "cpu"
    created: str = ""
    command: str = ""
    tool_version: str = ""


# one step of one matrix: vs base, vs the step before (None for the first), its Persistence
StepResults: TypeAlias = "tuple[LayerResult, LayerResult | None, Persistence | None]"


def _labels(paths: Sequence[str]) -> list[str]:
    """Short unique names: the basename, or the path when basenames collide."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    out = []
    for p, n in zip(paths, names):
        out.append(n if names.count(n) == 1 else os.path.normpath(p))
    return out


def _persistence(prev_u: torch.Tensor | None, prev_idx: Sequence[int], cur_u: torch.Tensor,
                 cur_idx: Sequence[int]) -> Persistence:
    """Follow intruders: prev_u (d, k) / cur_u (d, k) top-k vectors of consecutive steps."""
    if not cur_idx and not prev_idx:
        return Persistence()
    if prev_u is None or not prev_idx:
        return Persistence(new=tuple(cur_idx))
    if not cur_idx:
        return Persistence(gone=tuple(prev_idx))
    a = cur_u[:, list(cur_idx)]  # (d, |cur|)
    b = prev_u[:, list(prev_idx)]  # (d, |prev|)
    sim = (a.mT @ b).abs()  # (|cur|, |prev|)
    best, arg = sim.max(dim=1)  # (|cur|,)
    persistent, new, cos = [], [], []
    matched_prev = set()
    for j, (c, i) in enumerate(zip(best.tolist(), arg.tolist())):
        if c >= PERSIST_COS:
            persistent.append(cur_idx[j])
            cos.append(round(float(c), 6))
            matched_prev.add(prev_idx[i])
        else:
            new.append(cur_idx[j])
    gone = tuple(p for p in prev_idx if p not in matched_prev)
    return Persistence(tuple(persistent), tuple(new), gone, tuple(cos))


def _result(name, shape, dtype, found: Analysis | None = None, status="scanned",
            seconds=0.0) -> LayerResult:
    if found is None:
        return LayerResult(name=name, shape=tuple(shape), dtype=dtype, status=status)
    return found.layer(name, tuple(shape), dtype, seconds=seconds)


def run_track(base: str, checkpoints: Sequence[str], config: ScanConfig | None = None,
              progress: bool = False, command: str = "", base_cache=None,
              strict_base: bool = False) -> TrackReport:
    """Sequential fine-tunes: every step against the base and against the step before."""
    return _run(base, checkpoints, config, "track", progress, command, base_cache,
                strict_base)


def run_compare(base: str, checkpoints: Sequence[str], config: ScanConfig | None = None,
                progress: bool = False, command: str = "", base_cache=None,
                strict_base: bool = False) -> TrackReport:
    """Independent fine-tunes of one base, side by side; the base is decomposed once."""
    return _run(base, checkpoints, config, "compare", progress, command, base_cache,
                strict_base)


def _run(base, checkpoints, config, mode, progress, command, base_cache,
         strict_base=False) -> TrackReport:
    config = config or ScanConfig()
    validate_config(config)
    if len(checkpoints) < 1:
        raise IntruderError(f"{mode}: give at least one checkpoint after the base")
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    base_ck = open_checkpoint(base, allow_adapter=False)
    cks = [open_checkpoint(p) for p in checkpoints]
    identity.prefetch(base_ck.identity_files() + [f for ck in cks for f in ck.identity_files()])
    checks = chain_checks(mode, base_ck, cks, strict_base)  # adapters' declared bases
    pairings = [pair_checkpoints(base_ck, ck, config.include, config.exclude) for ck in cks]
    pair_maps = [{p.name: p for p in pg.pairs} for pg in pairings]
    names = [p.name for p in pairings[0].pairs if all(p.name in pm for pm in pair_maps)]
    if not names:
        raise IntruderError(f"no matrix of {base} is paired in every checkpoint "
                            f"({', '.join(checkpoints)}); see --include / --exclude")
    if base_cache is None and config.cache_dir:
        base_cache = BaseCache(config.cache_dir)
    labels = _labels(checkpoints)
    n = len(cks)
    vs_base: list[list[LayerResult]] = [[] for _ in range(n)]
    vs_prev: list[list[LayerResult]] = [[] for _ in range(n)]
    persist: list[dict[str, Persistence]] = [{} for _ in range(n)]
    if mode == "compare":
        _compare_streamed(names, pair_maps, config, progress, base_cache, vs_base)
    else:
        _track_streamed(names, pair_maps, config, progress, base_cache, vs_base, vs_prev,
                        persist)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cmd = command  # the caller's invocation (the CLI passes its command line)
    base_info = base_ck.info()
    elapsed = time.perf_counter() - t_start

    def report(base_info_, tuned_info, pairing, layers, extra=()):
        return ScanReport(base=base_info_, tuned=tuned_info, config=config, layers=tuple(layers),
                          unpaired_base=pairing.unpaired_base if pairing else (),
                          unpaired_tuned=pairing.unpaired_tuned if pairing else (),
                          skipped=pairing.skipped if pairing else (),
                          warnings=tuple(derivation_warnings(layers, config)) + tuple(extra),
                          seconds=elapsed, device=str(device), created=created, command=cmd,
                          tool_version=__version__, schema_version=SCHEMA_VERSION)

    entries = []
    infos = [ck.info() if c is None else dataclasses.replace(ck.info(), declared_base=c.to_dict())
             for ck, c in zip(cks, checks)]
    for i in range(n):
        warn = warning_text(checks[i], cks[i].path) if checks[i] is not None else None
        rb = report(base_info, infos[i], pairings[i], vs_base[i], [warn] if warn else [])
        # step i + 1 of a track carries i + 1 roundings of the stored weights against the base
        rb = replace(rb, verdict=decide(rb, i + 1 if mode == "track" else 1))
        rp = report(infos[i - 1], infos[i], None, vs_prev[i]) if mode == "track" and i else None
        rp = replace(rp, verdict=decide(rp)) if rp is not None else None
        entries.append(TrackEntry(label=labels[i], path=checkpoints[i], vs_base=rb, vs_previous=rp,
                                  persistence=persist[i] if mode == "track" else {}))
    return TrackReport(mode=mode, base=base_info, config=config, entries=tuple(entries),
                       seconds=elapsed, device=str(device), created=created, command=cmd,
                       tool_version=__version__)


# ------------------------------------------------------------------------------------------------
# Summaries and JSON
# ------------------------------------------------------------------------------------------------


def entry_summary(e: TrackEntry, mode: str, step: int = 1) -> dict:
    """One row of the track / compare table (also in the JSON). `step` (1-based, track): the
    cumulative update of step i carries up to i roundings of stored weights."""
    s = summary(e.vs_base)
    if mode == "track" and step > 1:
        s["provenance"] = provenance(e.vs_base, roundings=step).to_dict()
    row = {"label": e.label, "path": e.path, "kind": e.vs_base.tuned.kind,
           "intruders": s["total_intruders"], "layers_with_intruders": s["layers_with_intruders"],
           "counts_by_epsilon": s["counts_by_epsilon"], "min_max_cos": s["min_max_cos"],
           "mean_intruder_energy": s["mean_intruder_energy"],
           "novel_strength_max": (s["margin"].get("novel_strength_quantiles") or {}).get("max"),
           "layers_scanned": s["layers_scanned"], "layers_unchanged": s["layers_unchanged"],
           "provenance": s["provenance"],
           "verdict": verdict_dict(e.vs_base.verdict or decide(e.vs_base,
                                                               step if mode == "track" else 1)),
           "warnings": list(e.vs_base.warnings)}
    if mode == "track":
        if e.vs_previous is not None:
            sp = summary(e.vs_previous)
            row["vs_previous"] = {"intruders": sp["total_intruders"],
                                  "counts_by_epsilon": sp["counts_by_epsilon"],
                                  "min_max_cos": sp["min_max_cos"],
                                  "provenance": provenance(e.vs_previous).to_dict()}
        else:
            row["vs_previous"] = None
        row["persistent"] = sum(len(p.persistent) for p in e.persistence.values())
        row["new"] = sum(len(p.new) for p in e.persistence.values())
        row["gone"] = sum(len(p.gone) for p in e.persistence.values())
    return row


def to_dict(tr: TrackReport) -> dict:
    """The whole track / compare as JSON-ready data: per entry a full scan report (schema
    scan-report 1.x) against the base, and in a track against the previous step."""
    from dataclasses import asdict

    c = tr.config
    entries = []
    for i, e in enumerate(tr.entries, 1):
        row = entry_summary(e, tr.mode, i)
        vb = scan_dict(e.vs_base)
        vb["summary"]["provenance"] = row["provenance"]  # with the track's rounding count
        vb["verdict"] = row["verdict"]
        d = {"label": e.label, "path": e.path, "summary": row, "vs_base": vb,
             "vs_previous": scan_dict(e.vs_previous) if e.vs_previous is not None else None}
        if tr.mode == "track":
            d["persistence"] = {n: asdict(p) for n, p in e.persistence.items()
                                if p.persistent or p.new or p.gone}
        entries.append(d)
    return {"kind": f"intruder-{tr.mode}", "track_schema_version": TRACK_SCHEMA_VERSION,
            "tool_version": tr.tool_version, "created": tr.created, "command": tr.command,
            "device": tr.device, "seconds": tr.seconds, "base": asdict(tr.base),
            "config": {"top_k": c.top_k, "epsilon": list(c.epsilons), "vectors": c.vectors,
                       "include": c.include, "exclude": c.exclude},
            "persist_cos": PERSIST_COS if tr.mode == "track" else None,
            "entries": entries}


def dumps(tr: TrackReport) -> str:
    import json

    return json.dumps(to_dict(tr), indent=1, allow_nan=False)


def summaries(tr: TrackReport) -> list[dict]:
    """entry_summary of every checkpoint, in order."""
    return [entry_summary(e, tr.mode, i) for i, e in enumerate(tr.entries, 1)]


def _compare_streamed(names, pair_maps, config, progress, base_cache, vs_base) -> None:
    """Independent fine-tunes on the scan's streaming pipeline: per matrix one group of pairs
    sharing the base, read once and decomposed once (or taken from the cache) while the next
    groups are read; several CUDA streams and GPUs, and torchrun ranks, as in a scan."""
    handles: dict = {}
    groups = [tuple(pm[name] for pm in pair_maps) for name in names]
    for got in scan_pairs(groups, lambda ref: read_ref(ref, handles), config, progress=progress,
                          base_cache=base_cache):
        for i, res in enumerate(got):
            vs_base[i].append(res)


def _track_streamed(names, pair_maps, config, progress, base_cache, vs_base, vs_prev,
                    persist) -> None:
    """Sequential fine-tunes on the scan's streaming pipeline: per matrix one group (the base and
    every step's tensor), run by _track_group on a device while the next groups are read."""
    handles: dict = {}
    groups = [tuple(pm[name] for pm in pair_maps) for name in names]
    for name, got in zip(names, scan_pairs(groups, lambda ref: read_ref(ref, handles), config,
                                           progress=progress, base_cache=base_cache,
                                           group_fn=_track_group)):
        for i, (vb, vp, per) in enumerate(got):
            vs_base[i].append(vb)
            if i:
                vs_prev[i].append(vp)
            if per is not None:
                persist[i][name] = per


def _track_group(raw: Raw, device: torch.device, config: ScanConfig, base_cache,
                 on_copied: Callable[[], None] | None = None) -> tuple[StepResults, ...]:
    """One matrix of a track on `device` (the pipeline's group function): every step against
    the base (decomposed once, or from the cache) and against the step before, and intruders
    followed along. Returns per step (vs base, vs previous or None, Persistence or None)."""
    p0 = raw.pair
    name, shape, dtype = p0.name, tuple(p0.base.shape), p0.base.dtype
    steps = [raw, *raw.more]
    nb = device.type == "cuda"

    def nonfinite(i: int) -> StepResults:
        r = _result(name, shape, dtype, status="nonfinite")
        return r, (r if i else None), None

    # rounding that quantized storage put into the differences (io/dequant.noise_rms), from the
    # host tensors: the base's, and each full step's own
    n_base = _noise(p0.base, raw.w0)
    n_step = [_noise(m.pair.tuned, m.wt) if m.pair.lora is None and m.wt is not None else None
              for m in steps]
    w0 = stream.base_on(raw, device, config.allow_nonfinite)
    if w0 is None:
        if on_copied is not None:
            on_copied()
        return tuple(nonfinite(i) for i in range(len(steps)))
    # per step on the device: (LoRA factors, their tensors), None when the step's tensor is the
    # base's, else the full tensor
    held: list[tuple[LoraInfo, dict[TensorRef, torch.Tensor]] | torch.Tensor | None] = []
    for m in steps:
        p = m.pair
        if p.lora is not None:
            held.append((p.lora, {r: t.to(device, non_blocking=nb) for r, t in m.parts.items()}))
        elif p.tuned is None or p.tuned == p.base:
            held.append(None)
        else:
            assert m.wt is not None  # read_pair reads a tuned tensor that is not the base
            held.append(m.wt.to(device, non_blocking=nb))
    if nb:
        torch.cuda.current_stream(device).synchronize()  # host buffers are free after the copy
    if on_copied is not None:
        on_copied()
    k_side = "left" if config.vectors in ("left", "both") else "right"
    spec = raw.cached
    prev_w = w0  # (m, n) the previous step's weights
    prev_top: torch.Tensor | None = None  # (d, k) previous step's top-k vectors
    prev_intr: tuple[int, ...] = ()
    prev_noise: float | None = None  # quantization rounding rms of the previous step's weights
    out: list[StepResults] = []
    for i, (m, step) in enumerate(zip(steps, held)):
        t0 = time.perf_counter()
        p = m.pair
        if isinstance(step, tuple):  # LoRA factors, applied to the previous step's weights
            lora, parts = step
            wt = merge_lora(prev_w, lora, parts.__getitem__)
        else:
            wt = prev_w if step is None else step
        status = tuned_status(p, w0, wt, config.allow_nonfinite)  # raises on NaN / Inf
        if status == "nonfinite":
            out.append(nonfinite(i))
            prev_top, prev_intr = None, ()
            continue
        cur_intr: tuple[int, ...] = ()
        if status == "unchanged":
            vb = _result(name, shape, dtype, status="unchanged")
        else:
            found, spec = analyse(w0, wt, config, name, base_spec=spec,
                                  noise=_rss(n_base, n_step[i]))
            vb = _result(name, shape, dtype, found, seconds=time.perf_counter() - t0)
            cur_intr = tuple(x.index for x in found.intruders)
        vp = None
        if i > 0:
            if wt.dtype == prev_w.dtype and torch.equal(wt, prev_w):
                vp = _result(name, shape, dtype, status="unchanged")
            else:  # the previous step decomposed afresh: its top-k are prev_top
                pf, _ = analyse(prev_w, wt, config, name, noise=_rss(prev_noise, n_step[i]))
                vp = _result(name, shape, dtype, pf)
        cur_top = None
        if cur_intr or prev_intr:
            k = min(config.top_k, min(shape))
            sp = top_spectrum(wt, k, left=k_side == "left", right=k_side == "right")
            cur_top = sp.vecs(k_side == "left")[:, :k]  # (d, k)
        # cur_top is None only when neither step has intruders: nothing to follow
        per = _persistence(prev_top, prev_intr, cur_top, cur_intr) if cur_top is not None \
            else Persistence()
        out.append((vb, vp, per))
        prev_top, prev_intr = cur_top, cur_intr
        prev_w = wt
        prev_noise = n_step[i] if p.lora is None and step is not None else prev_noise
    if nb:  # results complete: the cache writer may read `spec` from any stream
        torch.cuda.current_stream(device).synchronize()
    if base_cache is not None and raw.key is not None and stream._grew(raw.cached, spec):
        base_cache.store(raw.key, spec, p0.base)
    return tuple(out)


def _noise(ref, t) -> float | None:
    """Rounding rms of a quantized stored tensor (None for plain float storage)."""
    if ref is None or ref.storage is None or t is None:
        return None

    handles: dict = {}
    return noise_rms(ref, t, lambda r: read_ref(r, handles))


def _rss(*parts):
    """Root sum of squares of the rounding rms values given (None: no quantized side)."""
    parts = [x for x in parts if x is not None]
    return sum(x * x for x in parts) ** 0.5 if parts else None
