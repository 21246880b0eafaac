"""Rescaling intruder dimensions (the paper's causal intervention) and writing the new checkpoint.

For each matrix with intruder set I (ranks in the tuned top-k spectrum, from a scan report):

    W' = Wt + (alpha - 1) * sum_{j in I} sigma_j u_j v_j^T

alpha = 1 is the identity, alpha = 0 removes the intruders, 0 < alpha < 1 shrinks them. The
triplets are recomputed exactly from Wt in float64 (intruder.spectral.decompose.top_spectrum),
checked against the singular values the scan recorded, and W' is written back in the tuned
tensor's dtype. Every other tensor is copied as raw bytes, so alpha = 1 reproduces the input bit
for bit. Several alphas are written in one pass: each tensor is read and decomposed once.

A PEFT adapter input is written as a merged model (BASE with every LoRA delta merged in float64,
modules_to_save replacements applied, lora_bias added to the bias: intruder.adapter_merge) before
the intruders are rescaled; the output mirrors BASE's layout. Every rescaled matrix, written here
or set in memory (intruder.inplace), is computed by rescale_rows.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import __version__
from .adapter_merge import (
    Reader,
    Source,
    adapter_sources,
    merged_bias,
    merged_lora,
    torch_dtype,
)
from .errors import IntruderError, OutputError, ReportError
from .io import open_checkpoint, pair_checkpoints
from .io.atomic import check_output
from .io.identity import recorded_mismatch
from .io.safetensors_file import DTYPES
from .io.writer import (
    CheckpointWriter,
    TensorSpec,
    identity_metadata,
    plan_like,
    plan_merged,
)
from .progress import bar as progress_bar
from .run.devices import resolve_device
from .spectral.decompose import top_spectrum
from .types import ScanReport

FORMULA = "W' = Wt + (alpha - 1) * sum_{j in I} sigma_j u_j v_j^T"
CHUNK_ELEMENTS = 1 << 24  # float64 elements per row block of one rescaled matrix (128 MiB)
SIGMA_RTOL = 1e-6  # recomputed vs recorded singular values, relative to sigma_1
DEGENERATE_RTOL = 1e-8  # an intruder this close in sigma to a kept vector is not well defined


@dataclass(frozen=True)
class LayerIntruders:
    """The intruders of one scanned matrix, as the scan report recorded them."""

    name: str  # report (base) name
    indices: tuple[int, ...]  # ranks in the tuned top-k spectrum
    sigma: tuple[float, ...]  # recorded top-k tuned singular values
    k: int  # how many top tuned triplets the scan computed
    shape: tuple[int, ...] = ()  # (m, n) as the report records it


@dataclass(frozen=True)
class LayerChange:
    """What one alpha did to one matrix."""

    name: str  # output tensor name
    indices: tuple[int, ...]
    sigma: tuple[float, ...]
    rel_change: float  # ||W'_stored - Wt||_F / ||Wt||_F, measured after rounding to the dtype


@dataclass(frozen=True)
class ScaleResult:
    """One written output."""

    alpha: float
    path: str
    kind: str  # file | dir
    layers: tuple[LayerChange, ...]
    n_tensors: int
    bytes: int
    seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def n_intruders(self) -> int:
        return sum(len(l.indices) for l in self.layers)


def select_intruders(report: ScanReport, epsilon: float | None = None) -> dict[str, LayerIntruders]:
    """Intruders per scanned matrix: the report's own (its first epsilon), or every top-k vector
    with max |cos| < `epsilon` when one is given (the report keeps max_cos for all top-k).

    A report is data from a file that may have been edited: every rank must lie in the top-k
    spectrum the layer records, appear once, and the layer must record its top-k singular values
    (sigma_tuned), which bind it to the checkpoint: they are compared with the values recomputed
    from the weights before anything is rescaled."""
    if epsilon is not None and not (math.isfinite(epsilon) and 0.0 < epsilon <= 1.0):
        raise IntruderError(f"--epsilon must lie in (0, 1], got {epsilon}")
    out = {}
    for l in report.layers:
        if l.status != "scanned":
            continue
        if epsilon is None:
            idx = tuple(sorted(i.index for i in l.intruders))
        else:
            idx = tuple(j for j, c in enumerate(l.max_cos) if c < epsilon)
        if not idx:
            continue
        k = len(l.sigma_tuned)
        if k == 0:
            raise ReportError(f"layer {l.name!r}: the scan report records no sigma_tuned (the "
                              f"top-k singular values), so it cannot be checked against the "
                              f"checkpoint it would rescale; rescan with `intruder scan`")
        bad = [j for j in idx if not (isinstance(j, int) and 0 <= j < k)]
        if bad:
            raise ReportError(f"layer {l.name!r}: intruder rank {bad[0]} is outside the top-{k} "
                              f"spectrum the report records (ranks 0..{k - 1})")
        dup = sorted({j for j in idx if idx.count(j) > 1})
        if dup:
            raise ReportError(f"layer {l.name!r}: intruder rank {dup[0]} is listed twice; it "
                              f"would be rescaled twice")
        out[l.name] = LayerIntruders(l.name, idx, tuple(l.sigma_tuned), k, tuple(l.shape))
    return out


def overflow_alpha(sel: LayerIntruders, alpha: float, dtype: torch.dtype) -> bool:
    """True when W' = Wt + (alpha - 1) C certainly has an entry beyond `dtype`'s range, judged
    from the recorded singular values alone (nothing read):
    max|W'| >= |alpha - 1| max|C| - max|Wt| >= |alpha - 1| ||C||_F / sqrt(m n) - sigma_1(Wt),
    with ||C||_F^2 = sum_{j in I} sigma_j^2 and max|Wt| <= ||Wt||_2 = sigma_1."""
    if not dtype.is_floating_point or len(sel.shape) != 2 or not sel.sigma:
        return False
    m, n = sel.shape
    c_fro = math.sqrt(math.fsum(sel.sigma[j] ** 2 for j in sel.indices))
    try:
        low = abs(alpha - 1.0) * c_fro / math.sqrt(m * n) - sel.sigma[0]
    except OverflowError:
        return True
    return low > float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class Factors:
    """The intruders of one matrix as float64 factors: sum_{j in I} sigma_j u_j v_j^T = us @ v^T."""

    us: torch.Tensor  # (m, |I|) float64: U_I diag(sigma_I)
    v: torch.Tensor  # (n, |I|) float64: V_I
    sigma: tuple[float, ...]  # recomputed sigma_j for j in I
    warnings: tuple[str, ...] = ()


def refuse_overflowing_alphas(report: ScanReport, alphas: Sequence[float],
                              epsilon: float | None = None) -> None:
    """Before any model is loaded or written: refuse an alpha whose rescaled weights certainly
    exceed their dtype's range (overflow_alpha on the report's singular values and dtypes)."""
    sel = select_intruders(report, epsilon)
    for l in report.layers:
        s = sel.get(l.name)
        if s is None or l.dtype not in DTYPES:
            continue
        dt = torch_dtype(l.dtype)
        for a in alphas:
            if overflow_alpha(s, float(a), dt):
                raise IntruderError(f"--alpha {float(a):g}: the rescaled {l.name!r} exceeds the "
                                    f"range of {l.dtype} (largest finite "
                                    f"{float(torch.finfo(dt).max):.4g}); nothing was written")


def intruder_factors(wt: torch.Tensor, sel: LayerIntruders, device=None,
                     where: str = "") -> Factors:
    """Recompute the top-k triplets of Wt (float64), check them against the report's singular
    values, and return the intruders' factors (kept low rank: a 7B sweep holds them for every
    matrix at once)."""
    dev = torch.device(device) if device is not None else wt.device
    w = wt.to(device=dev, dtype=torch.float64)  # (m, n)
    kk = min(sel.k + 1, min(w.shape))  # one more than the scan: the gap below rank k
    spec = top_spectrum(w, kk, left=True, right=True)  # u (m, kk), v (n, kk), sigma (kk,)
    del w
    sig = spec.sigma.cpu()
    ref = sel.sigma
    top = float(sig[0]) if sig.numel() else 0.0
    if ref:
        n = min(len(ref), sel.k, sig.numel())
        diff = max(abs(float(sig[j]) - ref[j]) for j in range(n))
        if diff > SIGMA_RTOL * max(top, ref[0]):
            raise ReportError(
                f"{where or sel.name}: singular values recomputed from the checkpoint differ from "
                f"the scan report's by {diff:.3g} (sigma_1 = {top:.6g}); the checkpoint is not the "
                f"one that was scanned; rescan it")
    assert spec.u is not None and spec.v is not None  # asked for with left=True, right=True
    idx = torch.tensor(sel.indices, dtype=torch.long, device=dev)
    u = spec.u[:, idx]  # (m, |I|)
    v = spec.v[:, idx]  # (n, |I|)
    s = spec.sigma[idx]  # (|I|,)
    warnings = []
    chosen = set(sel.indices)
    for j in sel.indices:
        for i in (j - 1, j + 1):
            if 0 <= i < sig.numel() and i not in chosen and \
                    abs(float(sig[i] - sig[j])) <= DEGENERATE_RTOL * top:
                warnings.append(f"{where or sel.name}: intruder {j} has the same singular value as "
                                f"kept vector {i} (sigma {float(sig[j]):.6g}); the rescaled "
                                f"direction inside that pair is not uniquely defined")
    return Factors((u * s[None, :]).contiguous(), v.contiguous(),
                   tuple(float(sig[j]) for j in sel.indices), tuple(warnings))


def rescale_rows(out: torch.Tensor, start: Callable[[int, int], torch.Tensor], f: Factors,
                 alpha: float, measure: bool = False, chunk: int | None = None) -> float:
    """The one rescaling computation: out = round_out(Wt + (alpha - 1) * us @ v^T), row block by
    row block (so no (m, n) float64 copy of a large matrix exists at once).

    out: the (m, n) tensor written (a model parameter or a new tensor), in the dtype to store;
    start(r0, r1): rows r0:r1 of the exact tuned matrix Wt, (b, n) float64 on f's device;
    f: the intruders' factors. Returns ||W'_stored - Wt||_F^2 when `measure` (else 0).
    Rows are only read before they are written, so `start` may read `out` itself. The caller
    handles alpha = 1 (the stored values, untouched)."""
    m, n = out.shape
    chunk = CHUNK_ELEMENTS if chunk is None else chunk
    rows = max(1, chunk // max(n, 1))
    sq = torch.zeros((), dtype=torch.float64, device=f.us.device)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        w = start(r0, r1)  # (b, n) float64
        c = f.us[r0:r1] @ f.v.mT  # (b, n) = (b, |I|) @ (|I|, n)
        new = torch.add(w, c, alpha=float(alpha) - 1.0).to(out.dtype)  # (b, n), as stored
        out[r0:r1].copy_(new)
        if measure:
            sq += (new.to(torch.float64) - w).square().sum()
    return float(sq) if measure else 0.0


def rescale(wt: torch.Tensor, f: Factors, alpha: float) -> torch.Tensor:
    """W' = Wt + (alpha - 1) * us @ v^T (rescale_rows), returned in wt's dtype on the CPU.
    alpha == 1 returns an exact copy of wt."""
    if alpha == 1:
        return wt.detach().clone().cpu()
    out = torch.empty(tuple(wt.shape), dtype=wt.dtype)  # (m, n)
    w = wt.detach()
    rescale_rows(out, lambda r0, r1: w[r0:r1].to(device=f.us.device, dtype=torch.float64),
                 f, alpha)
    return out


def rescale_matrix(wt: torch.Tensor, indices: Sequence[int], alpha: float, top_k: int = 10,
                   device=None) -> torch.Tensor:
    """One-call form: rescale the triplets at `indices` (ranks) of wt by alpha."""
    idx = tuple(sorted(int(j) for j in indices))
    if not idx or idx[0] < 0 or len(set(idx)) != len(idx):
        raise IntruderError(f"intruder ranks must be distinct non-negative integers, got "
                            f"{list(indices)}")
    sel = LayerIntruders("matrix", idx, (), max(top_k, idx[-1] + 1))
    return rescale(wt, intruder_factors(wt, sel, device), alpha)


# ---------------------------------------------------------------------------- checkpoint level


def resolve_inputs(report: ScanReport, report_path: str | None = None,
                   base: str | None = None, tuned: str | None = None) -> tuple[str, str]:
    """BASE and TUNED paths: given ones, else the report's (relative to the working directory,
    else to the report's folder; a hub snapshot no longer cached: its repo_id@commit)."""
    def find(given, info, what):
        if given:
            return given
        recorded = info.path
        cands = [recorded]
        if report_path and not os.path.isabs(recorded):
            cands.append(os.path.join(os.path.dirname(os.path.abspath(report_path)), recorded))
        for c in cands:
            if os.path.exists(c):
                return c
        if getattr(info, "repo_id", None) and getattr(info, "commit", None):
            return f"{info.repo_id}@{info.commit}"
        raise ReportError(f"{report_path or 'scan report'}: {what} checkpoint {recorded!r} "
                          f"(recorded in the report) not found; run from the scan's directory "
                          f"or give BASE and TUNED")

    return (find(base, report.base, "base"), find(tuned, report.tuned, "tuned"))


def _verify(ck, info, what: str, report_path: str | None) -> None:
    why = recorded_mismatch(ck, info)
    if why:
        raise ReportError(f"{ck.path}: {what} checkpoint does not match the scan report "
                          f"{report_path or ''} ({why}); it changed since the scan, so rescan "
                          f"it".replace("  ", " "))


def _full_sources(base_ck, tuned_ck, report: ScanReport, sel: dict[str, LayerIntruders]):
    sources = {n: Source("raw", r) for n, r in tuned_ck.refs.items()}
    pairing = pair_checkpoints(base_ck, tuned_ck, report.config.include, report.config.exclude)
    by_name = {p.name: p for p in pairing.pairs}
    for name, s in sel.items():
        p = by_name.get(name)
        if p is None or p.tuned is None:
            raise ReportError(f"layer {name!r} of the scan report has no counterpart in "
                              f"{tuned_ck.path}")
        sources[p.tuned.name].intruders = s
    return sources, plan_like(tuned_ck)


def _utf8(path: str) -> str:
    """A path as valid Unicode for the safetensors header: the bytes of a non-UTF-8 file name
    (or of any non-ASCII name under LANG=C) shown escaped, \xe9."""
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")


def provenance(report: ScanReport, alpha: float, changes: dict[str, tuple[int, ...]],
               epsilon: float | None) -> dict[str, str]:
    """Safetensors metadata (strings) recording how the output was made."""
    c = report.config
    return {
        "intruder.tool_version": __version__,
        "intruder.intervention": FORMULA,
        "intruder.alpha": repr(float(alpha)),
        "intruder.base": _utf8(report.base.path),
        "intruder.base_fingerprint": report.base.fingerprint,
        "intruder.tuned": _utf8(report.tuned.path),
        "intruder.tuned_fingerprint": report.tuned.fingerprint,
        **identity_metadata(report),
        "intruder.epsilon": repr(float(epsilon if epsilon is not None else c.epsilon)),
        "intruder.top_k": str(c.top_k),
        "intruder.vectors": c.vectors,
        "intruder.intruders": json.dumps({k: list(v) for k, v in sorted(changes.items())},
                                         separators=(",", ":")),
    }


def scale_checkpoint(report: ScanReport, alphas: Sequence[float], outputs: Sequence[str], *,
                     report_path: str | None = None, base: str | None = None,
                     tuned: str | None = None, epsilon: float | None = None,
                     device: str | None = None, progress: bool = False) -> list[ScaleResult]:
    """Write one rescaled checkpoint per alpha (outputs[i] for alphas[i]) in a single pass.

    Outputs mirror TUNED (file -> file, directory -> directory with companions and index);
    an adapter TUNED gives merged model directories laid out like BASE. Nothing is written over
    an input; each output appears atomically and only when complete.
    """
    alphas = [float(a) for a in alphas]
    if len(alphas) != len(outputs) or not alphas:
        raise IntruderError("one output path is needed per alpha")
    for a in alphas:
        if not math.isfinite(a):
            raise IntruderError(f"--alpha must be a finite number, got {a}")
    t0 = time.perf_counter()
    base_path, tuned_path = resolve_inputs(report, report_path, base, tuned)
    base_ck = open_checkpoint(base_path, allow_adapter=False)
    tuned_ck = open_checkpoint(tuned_path)
    _verify(base_ck, report.base, "base", report_path)
    _verify(tuned_ck, report.tuned, "tuned", report_path)
    for out in outputs:
        check_output(out, [base_path, tuned_path])
    if len({os.path.realpath(o) for o in outputs}) != len(outputs):
        raise OutputError("two alphas would write the same output path")
    sel = select_intruders(report, epsilon)
    written = base_ck if tuned_ck.kind == "adapter" else tuned_ck
    if written.kind == "gguf":
        raise IntruderError(f"{written.path}: scale writes safetensors laid out like this "
                            f"checkpoint, and cannot write GGUF; convert it to safetensors "
                            f"(float16/bfloat16/float32) first")
    if tuned_ck.kind == "adapter":
        sources, overrides, extra = adapter_sources(base_ck, tuned_ck, sel)
        plan = plan_merged(base_ck, overrides, extra, overlay_dir=tuned_ck.path)
    else:
        sources, plan = _full_sources(base_ck, tuned_ck, report, sel)
    for src in sources.values():
        if (src.intruders is not None or src.kind == "lora") and src.ref.storage is not None:
            raise IntruderError(f"{src.ref.path}: tensor {src.ref.name!r} is stored as "
                                f"{src.ref.storage.kind}; scale writes the rescaled weights in "
                                f"the stored dtype and does not re-quantize: convert it to "
                                f"float16/bfloat16/float32 safetensors first")
    _refuse_overflow(sources, plan, alphas)
    dev = resolve_device(device or report.config.device)
    intr_names = {n: s.intruders.indices for n, s in sources.items() if s.intruders is not None}
    metas = [dict(base_ck.metadata if tuned_ck.kind == "adapter" else tuned_ck.metadata,
                  **provenance(report, a, intr_names, epsilon)) for a in alphas]
    changes: list[list[LayerChange]] = [[] for _ in alphas]
    warnings: list[str] = []
    reader = Reader()
    specs = list(plan.tensors())
    n_out = len(alphas)
    bar = progress_bar(len(specs), f"writing {n_out} checkpoint{'s' if n_out > 1 else ''}", "tensor",
                       progress)
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(CheckpointWriter(out, plan, meta, _index_extra(meta)))
                   for out, meta in zip(outputs, metas)]
        for spec in specs:
            src = sources[spec.name]
            for w, data in zip(writers, _produce(src, spec, alphas, reader, dev, changes,
                                                 warnings)):
                w.write(spec.name, data)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    return [ScaleResult(alpha=a, path=out, kind=plan.kind, layers=tuple(ch),
                        n_tensors=len(specs), bytes=w.bytes_written, seconds=seconds,
                        warnings=tuple(warnings))
            for a, out, ch, w in zip(alphas, outputs, changes, writers)]


def _refuse_overflow(sources, plan, alphas) -> None:
    """An alpha whose rescaled weights cannot be stored in their dtype is refused before any
    output is opened (the exact check on each rescaled tensor follows in _produce)."""
    for spec in plan.tensors():
        s = sources[spec.name].intruders
        if s is None:
            continue
        dt = torch_dtype(spec.dtype)
        for a in alphas:
            if overflow_alpha(s, a, dt):
                raise IntruderError(f"--alpha {a:g}: the rescaled {spec.name!r} exceeds the "
                                    f"range of {spec.dtype} (largest finite "
                                    f"{float(torch.finfo(dt).max):.4g}); nothing was written")


def _index_extra(meta: dict[str, str]) -> dict[str, object]:
    """Provenance for model.safetensors.index.json, as JSON values rather than strings."""
    text = {k[len("intruder."):]: v for k, v in meta.items() if k.startswith("intruder.")}
    prov: dict[str, object] = dict(text)
    prov["intruders"] = json.loads(text["intruders"])
    for key in ("base_files", "tuned_files"):
        if key in text:
            prov[key] = json.loads(text[key])
    for key in ("alpha", "epsilon"):
        prov[key] = float(text[key])
    prov["top_k"] = int(text["top_k"])
    return {"intruder": prov}


def _produce(src: Source, spec: TensorSpec, alphas: Sequence[float], reader: Reader,
             dev: torch.device, changes: list[list[LayerChange]], warnings: list[str]):
    """Yield the bytes (or tensor) of one output tensor for each alpha in turn; a generator, so
    only one alpha's rescaled copy exists at a time."""
    out_dtype = torch_dtype(spec.dtype)
    if src.kind in ("raw", "replace") and src.intruders is None:
        raw = reader.raw(src.ref)
        yield from [raw] * len(alphas)
        return
    if src.kind == "bias":
        merged = merged_bias(src, reader, out_dtype)
        yield from [merged] * len(alphas)
        return
    identity: torch.Tensor | None = None
    if src.kind == "lora":
        wt = merged_lora(src, reader, spec.name)  # float64, base layout
        identity = wt.to(out_dtype)
    else:  # raw or replace, with intruders: the stored tuned tensor
        wt = reader.read(src.ref)
    if src.intruders is None:
        yield from [identity] * len(alphas)
        return
    f = intruder_factors(wt, src.intruders, dev, where=f"{src.ref.path}: {spec.name!r}")
    warnings.extend(f.warnings)
    wt64 = wt.to(device=dev, dtype=torch.float64)  # (m, n)
    norm = float(wt64.norm())
    for i, a in enumerate(alphas):
        if a == 1:  # the identity: the stored bytes (or the merged tensor) untouched
            data = reader.raw(src.ref) if identity is None else identity
            sq = 0.0 if identity is None else \
                float((identity.to(device=dev, dtype=torch.float64) - wt64).square().sum())
        else:
            stored = torch.empty(tuple(wt.shape), dtype=out_dtype)  # (m, n)
            sq = rescale_rows(stored, lambda r0, r1: wt64[r0:r1], f, a, measure=True)
            if stored.is_floating_point() and not bool(torch.isfinite(stored).all()):
                raise IntruderError(f"--alpha {a:g}: the rescaled {spec.name!r} has values "
                                    f"beyond the range of {spec.dtype}; nothing was written")
            data = stored
        rel = sq ** 0.5 / norm if norm > 0 else 0.0
        changes[i].append(LayerChange(spec.name, src.intruders.indices, f.sigma, rel))
        yield data
        del data


__all__ = ["CHUNK_ELEMENTS", "FORMULA", "Factors", "LayerChange", "LayerIntruders",
           "ScaleResult", "intruder_factors", "overflow_alpha", "provenance",
           "refuse_overflowing_alphas", "rescale", "rescale_matrix", "rescale_rows",
           "resolve_inputs", "scale_checkpoint", "select_intruders"]
