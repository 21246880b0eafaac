"""Rescaling intruder dimensions in memory: in place for any alpha and back, or once on a copy.

    r = InPlaceRescaler(model, report)          # model: a torch module holding the TUNED weights
    r.set_alpha(0.5)                            # W' = Wt + (0.5 - 1) * sum_j sigma_j u_j v_j^T
    ... evaluate model ...
    r.restore()                                 # every weight bit for bit as it was loaded

    model = rescaled_copy(peft_or_module_or_state_dict, report, 0.5)   # intruder.rescale

The intruder triplets are recomputed from the loaded weights in float64 and checked against the
singular values in the scan report (intruder.intervene.intruder_factors); only their low-rank
factors are kept. Each set_alpha computes W' = Wt + (alpha - 1) * U_I diag(sigma_I) V_I^T with
intruder.intervene.rescale_rows (the computation `intruder scale` writes with) from a kept copy of
the original weight (never by subtracting the previous alpha's change), rounds it to the STORAGE
dtype (the dtype the checkpoint holds) and then to the parameter's dtype. So a model loaded in
float32 from a float16 checkpoint sees exactly the weights of the written alpha checkpoint, and
alpha = 1 copies the originals back bit for bit. Works on CPU, on one GPU, and on models sharded
over several GPUs (each matrix is processed on the device that holds it).

A PEFT adapter starts from its float64 merge (intruder.adapter_merge.AdapterMerge, the merge the
writer uses): the model holds the merge rounded to its dtype, and the rounding residual is kept
beside the originals, so every alpha is rescaled from the unrounded merge as `intruder scale`
does. rescaled_copy keeps that residual in float64, which makes its result equal to the written
checkpoint tensor for tensor; the sweep keeps it in float32 (half the memory).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch

from .adapter_merge import AdapterMerge
from .errors import InputError, IntruderError, ReportError
from .intervene import (
    CHUNK_ELEMENTS,
    Factors,
    LayerChange,
    LayerIntruders,
    intruder_factors,
    rescale_rows,
    select_intruders,
)
from .io.memory import as_checkpoint, from_module, from_peft, is_peft_model
from .io.pairing import _align
from .types import ScanReport

KEEP = ("auto", "device", "cpu", "none")


@dataclass(frozen=True)
class Target:
    """One model parameter whose intruders are rescaled."""

    layer: str  # the scan report's layer name
    param: str  # the model's parameter name
    indices: tuple[int, ...]  # intruder ranks in the tuned top-k spectrum
    storage_dtype: torch.dtype  # the dtype outputs are rounded to (the checkpoint's)


def match_parameters(model: torch.nn.Module | Iterable[str], names: Iterable[str]
                     ) -> dict[str, str]:
    """Report layer name -> model parameter (or state dict) name: exact, else differing by one
    leading component ('model.layers.0...' vs 'layers.0...'), when that match is unique."""
    params = [n for n, _ in model.named_parameters()] if isinstance(model, torch.nn.Module) \
        else list(model)
    return _align(list(names), params)


class InPlaceRescaler:
    """Moves a loaded model between alphas in place; see the module docstring.

    Args:
        model: a torch module whose parameters hold the tuned weights the report was made from,
            or a mutable {name: tensor} mapping (its tensors are changed in place).
        report: the scan report (its intruders at its own epsilon, or below `epsilon`).
        storage_dtypes: report layer name -> dtype the checkpoint stores it in (default: the
            parameter's dtype). Give it when the model was loaded in a wider dtype than stored.
        keep: where the original weights are kept: "auto" (on the parameter's device when it has
            room, else in host memory), "device", "cpu", or "none" (no copy: one set_alpha only,
            for a copy that stays rescaled, as rescaled_copy makes).
        exact: report layer name -> the tuned matrix before rounding to the stored dtype (a
            PEFT adapter merged in float64: intruder.adapter_merge.AdapterMerge.exact), or None. The
            intruders are then recomputed from it and each alpha starts from it, as
            `intruder scale` does when it writes the checkpoint; its difference from the loaded
            weights is kept in `residual_dtype` beside the originals (float64: exactly the
            unrounded matrix; float32: within float32's precision of the residual).
        device: where the triplets are recomputed and the row blocks computed (default: the
            device holding each parameter).
    """

    def __init__(self, model: torch.nn.Module | MutableMapping[str, torch.Tensor],
                 report: ScanReport, *,
                 epsilon: float | None = None,
                 storage_dtypes: Mapping[str, torch.dtype] | None = None,
                 keep: str = "auto",
                 exact: Callable[[str], torch.Tensor | None] | None = None,
                 residual_dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None):
        if keep not in KEEP:
            raise IntruderError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
        self.model = model
        self.report = report
        self.keep = keep
        sel: dict[str, LayerIntruders] = select_intruders(report, epsilon)
        is_module = isinstance(model, torch.nn.Module)
        params: dict[str, torch.Tensor] = dict(model.named_parameters()) \
            if isinstance(model, torch.nn.Module) else dict(model)
        mapping = match_parameters(params, sel)
        missing = [n for n in sel if n not in mapping]
        if missing:
            what = "parameter of the model" if is_module else "tensor of the state dict"
            raise ReportError(f"layer {missing[0]!r} of the scan report (and {len(missing) - 1} "
                              f"more) matches no {what}; the report belongs to another model")
        shapes = {l.name: tuple(l.shape) for l in report.layers}
        storage = dict(storage_dtypes or {})
        self.targets: list[Target] = []
        self._params: list[torch.Tensor] = []
        self._factors: list[Factors] = []
        self._originals: list[torch.Tensor] = []
        self._residuals: list[torch.Tensor | None] = []  # exact - loaded
        self._norms: list[float] = []
        warnings: list[str] = []
        with torch.no_grad():
            for layer, s in sel.items():
                pname = mapping[layer]
                p = params[pname]
                if shapes.get(layer) and tuple(p.shape) != shapes[layer]:
                    raise ReportError(f"parameter {pname!r} has shape {tuple(p.shape)} but the "
                                      f"scan report's {layer!r} is {shapes[layer]}")
                given = exact(layer) if exact is not None else None
                if given is not None and tuple(given.shape) != tuple(p.shape):
                    raise ReportError(f"exact tuned matrix of {layer!r} has shape "
                                      f"{tuple(given.shape)}, parameter {pname!r} "
                                      f"{tuple(p.shape)}")
                w = p.detach() if given is None else given.to(device=p.device,
                                                              dtype=torch.float64)
                dev = torch.device(device) if device is not None else p.device
                f = intruder_factors(w, s, dev, where=f"model parameter {pname!r}")
                warnings.extend(f.warnings)
                res = None
                if given is not None:  # (m, n) exact - loaded
                    res = (w - p.detach().to(torch.float64)).to(residual_dtype)
                    res = res if bool(res.any()) else None
                self.targets.append(Target(layer, pname, s.indices, storage.get(layer, p.dtype)))
                self._params.append(p)
                self._factors.append(f)
                self._residuals.append(res)
                self._norms.append(float(w.to(torch.float64).norm()))
                del w, given
            self._keep_originals(keep)
        self.warnings: tuple[str, ...] = tuple(warnings)
        self.alpha = 1.0

    def _keep_originals(self, keep: str) -> None:
        need: dict[torch.device, int] = {}
        for p, r in zip(self._params, self._residuals):
            extra = 0 if r is None else r.numel() * r.element_size()
            need[p.device] = need.get(p.device, 0) + p.numel() * p.element_size() + extra
        on_device = {}
        for dev, n in need.items():
            if keep in ("cpu", "none") or dev.type == "cpu":
                on_device[dev] = dev.type == "cpu"
            elif keep == "device":
                on_device[dev] = True
            else:  # room for the copies plus one float64 row block, with a margin
                free, _ = torch.cuda.mem_get_info(dev) if dev.type == "cuda" else (0, 0)
                on_device[dev] = free > 1.1 * n + 4 * CHUNK_ELEMENTS * 8
        for i, p in enumerate(self._params):
            # keep == "none": the parameter itself (rows are read before they are written)
            self._originals.append(p.detach() if keep == "none" else
                                   _keep(p.detach(), on_device[p.device]))
            res = self._residuals[i]
            if res is not None:
                self._residuals[i] = _keep(res, on_device[p.device])

    @property
    def n_intruders(self) -> int:
        return sum(len(t.indices) for t in self.targets)

    @property
    def kept_bytes(self) -> int:
        """Bytes held by the copies of the original weights (and the residuals)."""
        kept = 0 if self.keep == "none" else \
            sum(o.numel() * o.element_size() for o in self._originals)
        return kept + sum(r.numel() * r.element_size() for r in self._residuals if r is not None)

    def set_alpha(self, alpha: float, measure: bool = True) -> tuple[LayerChange, ...]:
        """Put the model at `alpha` (from the kept originals, whatever the current alpha).
        Returns what changed per matrix (||W'_stored - Wt||_F / ||Wt||_F when `measure`)."""
        alpha = float(alpha)
        if not math.isfinite(alpha):
            raise IntruderError(f"alpha must be a finite number, got {alpha}")
        if self.keep == "none" and self.alpha != 1.0 and alpha != self.alpha:
            raise IntruderError("this rescaler keeps no copy of the original weights "
                                "(keep='none'): it sets one alpha only")
        out = []
        with torch.no_grad():
            for t, p, f, orig, res, norm in zip(self.targets, self._params, self._factors,
                                                self._originals, self._residuals, self._norms):
                if alpha == 1.0:
                    if self.keep != "none":  # (else p holds its original already)
                        p.data.copy_(orig)
                    out.append(LayerChange(t.param, t.indices, f.sigma, 0.0))
                    continue
                sq = _rescale(p, orig, res, f, alpha, t.storage_dtype, measure)
                if not bool(torch.isfinite(p).all()):  # beyond the storage dtype's range
                    if self.keep != "none":
                        p.data.copy_(orig)
                    raise IntruderError(f"alpha {alpha:g}: the rescaled {t.param!r} has values "
                                        f"beyond the range of {t.storage_dtype}; nothing was "
                                        f"evaluated at this alpha")
                rel = (sq ** 0.5) / norm if measure and norm > 0 else 0.0
                out.append(LayerChange(t.param, t.indices, f.sigma, rel))
        self.alpha = alpha
        return tuple(out)

    def restore(self) -> None:
        """Every rescaled parameter back to the weights it held when the rescaler was built."""
        self.set_alpha(1.0, measure=False)

    def __enter__(self) -> InPlaceRescaler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _keep(t: torch.Tensor, on_device: bool) -> torch.Tensor:
    """A copy of t on its device, or in (pinned, when CUDA is there) host memory."""
    if on_device:
        return t.clone()
    host = t.to("cpu", copy=True)
    return host.pin_memory() if torch.cuda.is_available() else host


def _rescale(p: torch.Tensor, orig: torch.Tensor, res: torch.Tensor | None, f: Factors,
             alpha: float, storage: torch.dtype, measure: bool) -> float:
    """p = round_storage(orig [+ res] + (alpha - 1) * us @ v^T) (intervene.rescale_rows, in row
    blocks); returns the squared Frobenius norm of the stored change from orig [+ res]."""
    dev = f.us.device

    def start(r0: int, r1: int) -> torch.Tensor:  # (b, n) float64 rows of the exact Wt
        w = orig[r0:r1].to(device=dev, dtype=torch.float64, copy=True)
        if res is not None:  # the exact (unrounded) tuned rows
            w += res[r0:r1].to(device=dev, dtype=torch.float64)
        return w

    if storage == p.dtype:
        return rescale_rows(p.data, start, f, alpha, measure, CHUNK_ELEMENTS)
    stored = torch.empty(tuple(p.shape), dtype=storage, device=p.device)  # (m, n)
    sq = rescale_rows(stored, start, f, alpha, measure, CHUNK_ELEMENTS)
    p.data.copy_(stored)
    return sq


def _load_into(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into a module's parameters / buffers by state-dict name."""
    own = model.state_dict(keep_vars=True)
    unknown = [n for n in tensors if n not in own]
    if unknown:
        raise ReportError(f"tensor {unknown[0]!r} has no place in the {type(model).__name__} "
                          f"(and {len(unknown) - 1} more)")
    with torch.no_grad():
        for n, t in tensors.items():
            own[n].copy_(t.to(own[n].device))


def rescaled_copy(obj: Any, report: ScanReport, alpha: float, epsilon: float | None = None,
                  device: str | None = None) -> Any:
    """A rescaled copy of a state dict, a module or a PEFT model (merged: a plain model), equal
    tensor for tensor to what `intruder scale --alpha` writes for the same model held in its
    stored dtype. Returns a dict for a state dict, else a torch module (for a transformers
    model, one that `lm_eval.models.huggingface.HFLM(pretrained=...)` accepts). The input is
    left as it was."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"alpha must be a finite number, got {alpha!r}")
    alpha = float(alpha)
    if isinstance(obj, torch.nn.Module) and is_peft_model(obj):
        merge = AdapterMerge(from_module(obj, "base"), from_peft(obj),
                             select_intruders(report, epsilon))
        peft_copy: Any = copy.deepcopy(obj)  # a PeftModel (nn.Module's typing hides unload)
        model = peft_copy.unload()  # the base model (modules_to_save applied)
        _load_into(model, {n: merge.stored(n) for n in merge.changed()})
        InPlaceRescaler(model, report, epsilon=epsilon, keep="none", exact=merge.exact,
                        residual_dtype=torch.float64, device=device).set_alpha(alpha, False)
        return model
    ck = as_checkpoint(obj, "tuned")
    if ck is None or ck.kind == "adapter":
        raise InputError(f"rescale: expected a state dict, a torch.nn.Module or a PEFT model, "
                         f"got {type(obj).__name__} (for a checkpoint on disk use "
                         f"`intruder scale`)")
    target: torch.nn.Module | dict[str, torch.Tensor]
    if isinstance(obj, torch.nn.Module):
        target = copy.deepcopy(obj)
    else:  # the rescaled tensors are new ones; the others are shared with the input
        target = dict(obj)
        for name in match_parameters(target, select_intruders(report, epsilon)).values():
            target[name] = target[name].detach().clone()
    InPlaceRescaler(target, report, epsilon=epsilon, keep="none",
                    device=device).set_alpha(alpha, measure=False)
    return target


__all__ = ["CHUNK_ELEMENTS", "InPlaceRescaler", "Target", "match_parameters", "rescaled_copy"]
