"""Rescaling intruder dimensions inside a loaded model, in place, for any alpha and back.

    r = InPlaceRescaler(model, report)          # model: a torch module holding the TUNED weights
    r.set_alpha(0.5)                            # W' = Wt + (0.5 - 1) * sum_j sigma_j u_j v_j^T
    ... evaluate model ...
    r.restore()                                 # every weight bit for bit as it was loaded

The intruder triplets are recomputed from the loaded weights in float64 and checked against the
singular values in the scan report (intruder.intervene.intruder_factors); only their low-rank
factors are kept. Each set_alpha computes W' = Wt + (alpha - 1) * U_I diag(sigma_I) V_I^T in
float64 from a kept copy of the original weight (never by subtracting the previous alpha's
change), rounds it to the STORAGE dtype (the dtype the checkpoint holds; what `intruder scale`
would write) and then to the parameter's dtype. So a model loaded in float32 from a float16
checkpoint sees exactly the weights of the written alpha checkpoint, and alpha = 1 copies the
originals back bit for bit. Works on CPU, on one GPU, and on models sharded over several GPUs
(each matrix is processed on the device that holds it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import IntruderError, ReportError
from .intervene import (
    Factors,
    LayerChange,
    LayerIntruders,
    intruder_factors,
    select_intruders,
)
from .io.pairing import _align
from .types import ScanReport

CHUNK_ELEMENTS = 1 << 24  # float64 elements per row block of one update (128 MiB)


@dataclass(frozen=True)
class Target:
    """One model parameter whose intruders are rescaled."""

    layer: str  # the scan report's layer name
    param: str  # the model's parameter name
    indices: tuple[int, ...]  # intruder ranks in the tuned top-k spectrum
    storage_dtype: torch.dtype  # the dtype outputs are rounded to (the checkpoint's)


def match_parameters(model: torch.nn.Module, names) -> dict[str, str]:
    """Report layer name -> model parameter name: exact, else differing by one leading
    component ('model.layers.0...' vs 'layers.0...'), when that match is unique."""
    params = [n for n, _ in model.named_parameters()]
    return _align(list(names), params)


class InPlaceRescaler:
    """Moves a loaded model between alphas in place; see the module docstring.

    Args:
        model: a torch module whose parameters hold the tuned weights the report was made from.
        report: the scan report (its intruders at its own epsilon, or below `epsilon`).
        storage_dtypes: report layer name -> dtype the checkpoint stores it in (default: the
            parameter's dtype). Give it when the model was loaded in a wider dtype than stored.
        keep: where the original weights are kept: "auto" (on the parameter's device when it has
            room, else in host memory), "device" or "cpu".
        exact: report layer name -> the tuned matrix before rounding to the stored dtype (a
            PEFT adapter merged in float64: intruder.intervene.adapter_exact), or None. The
            intruders are then recomputed from it and each alpha starts from it, as
            `intruder scale` does when it writes the checkpoint; its difference from the loaded
            weights is kept in float32 beside the originals.
    """

    def __init__(self, model: torch.nn.Module, report: ScanReport, *,
                 epsilon: float | None = None,
                 storage_dtypes: Mapping[str, torch.dtype] | None = None,
                 keep: str = "auto",
                 exact: Callable[[str], torch.Tensor | None] | None = None):
        if keep not in ("auto", "device", "cpu"):
            raise IntruderError(f"keep must be auto, device or cpu, got {keep!r}")
        self.model = model
        self.report = report
        sel: dict[str, LayerIntruders] = select_intruders(report, epsilon)
        mapping = match_parameters(model, sel)
        missing = [n for n in sel if n not in mapping]
        if missing:
            raise ReportError(f"layer {missing[0]!r} of the scan report (and {len(missing) - 1} "
                              f"more) matches no parameter of the model; the report belongs to "
                              f"another model")
        params = dict(model.named_parameters())
        shapes = {l.name: tuple(l.shape) for l in report.layers}
        storage_dtypes = dict(storage_dtypes or {})
        self.targets: list[Target] = []
        self._params: list[torch.nn.Parameter] = []
        self._factors: list[Factors] = []
        self._originals: list[torch.Tensor] = []
        self._residuals: list[torch.Tensor | None] = []  # exact - loaded, float32
        self._norms: list[float] = []
        warnings: list[str] = []
        with torch.no_grad():
            for layer, s in sel.items():
                pname = mapping[layer]
                p = params[pname]
                if shapes.get(layer) and tuple(p.shape) != shapes[layer]:
                    raise ReportError(f"parameter {pname!r} has shape {tuple(p.shape)} but the "
                                      f"scan report's {layer!r} is {shapes[layer]}")
                sdt = storage_dtypes.get(layer, p.dtype)
                given = exact(layer) if exact is not None else None
                if given is not None and tuple(given.shape) != tuple(p.shape):
                    raise ReportError(f"exact tuned matrix of {layer!r} has shape "
                                      f"{tuple(given.shape)}, parameter {pname!r} "
                                      f"{tuple(p.shape)}")
                w = p.detach() if given is None else given.to(device=p.device,
                                                              dtype=torch.float64)
                f = intruder_factors(w, s, p.device, where=f"model parameter {pname!r}")
                warnings.extend(f.warnings)
                res = None
                if given is not None:  # (m, n) exact - loaded
                    res = (w - p.detach().to(torch.float64)).to(torch.float32)
                    res = res if bool(res.any()) else None
                self.targets.append(Target(layer, pname, s.indices, sdt))
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
            extra = 0 if r is None else r.numel() * 4
            need[p.device] = need.get(p.device, 0) + p.numel() * p.element_size() + extra
        on_device = {}
        for dev, n in need.items():
            if keep == "cpu" or dev.type == "cpu":
                on_device[dev] = dev.type == "cpu"
            elif keep == "device":
                on_device[dev] = True
            else:  # room for the copies plus one float64 row block, with a margin
                free, _ = torch.cuda.mem_get_info(dev) if dev.type == "cuda" else (0, 0)
                on_device[dev] = free > 1.1 * n + 4 * CHUNK_ELEMENTS * 8
        for i, p in enumerate(self._params):
            self._originals.append(_keep(p.detach(), on_device[p.device]))
            if self._residuals[i] is not None:
                self._residuals[i] = _keep(self._residuals[i], on_device[p.device])

    @property
    def n_intruders(self) -> int:
        return sum(len(t.indices) for t in self.targets)

    @property
    def kept_bytes(self) -> int:
        """Bytes held by the copies of the original weights."""
        return sum(o.numel() * o.element_size() for o in self._originals) + \
            sum(r.numel() * r.element_size() for r in self._residuals if r is not None)

    def set_alpha(self, alpha: float, measure: bool = True) -> tuple[LayerChange, ...]:
        """Put the model at `alpha` (from the kept originals, whatever the current alpha).
        Returns what changed per matrix (||W'_stored - Wt||_F / ||Wt||_F when `measure`)."""
        alpha = float(alpha)
        if not torch.isfinite(torch.tensor(alpha)):
            raise IntruderError(f"alpha must be a finite number, got {alpha}")
        out = []
        with torch.no_grad():
            for t, p, f, orig, res, norm in zip(self.targets, self._params, self._factors,
                                                self._originals, self._residuals, self._norms):
                if alpha == 1.0:
                    p.data.copy_(orig)
                    out.append(LayerChange(t.param, t.indices, f.sigma, 0.0))
                    continue
                sq = _rescale_rows(p, orig, res, f, alpha, t.storage_dtype, measure)
                if not bool(torch.isfinite(p).all()):  # beyond the storage dtype's range
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

    def __exit__(self, *exc) -> None:
        self.restore()


def _keep(t: torch.Tensor, on_device: bool) -> torch.Tensor:
    """A copy of t on its device, or in (pinned, when CUDA is there) host memory."""
    if on_device:
        return t.clone()
    host = t.to("cpu", copy=True)
    return host.pin_memory() if torch.cuda.is_available() else host


def _rescale_rows(p: torch.Tensor, orig: torch.Tensor, res: torch.Tensor | None, f: Factors,
                  alpha: float, storage: torch.dtype, measure: bool) -> float:
    """p = round_storage(orig [+ res] + (alpha - 1) * us @ v^T) in row blocks; returns the
    squared Frobenius norm of the stored change from orig [+ res] (0 when not measured)."""
    m, n = p.shape
    rows = max(1, CHUNK_ELEMENTS // max(n, 1))
    dev = p.device
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        w = orig[r0:r1].to(device=dev, dtype=torch.float64, non_blocking=True)  # (b, n)
        if res is not None:  # the exact (unrounded) tuned rows
            w += res[r0:r1].to(device=dev, dtype=torch.float64, non_blocking=True)
        c = f.us[r0:r1] @ f.v.mT  # (b, n) = (b, |I|) @ (|I|, n)
        new = torch.add(w, c, alpha=alpha - 1.0).to(storage)  # (b, n), the value to store
        p.data[r0:r1].copy_(new)
        if measure:
            sq += (new.to(torch.float64) - w).square().sum()
    return float(sq) if measure else 0.0


__all__ = ["CHUNK_ELEMENTS", "InPlaceRescaler", "Target", "match_parameters"]
