"""Reading one matrix pair for the per-matrix analysis: finiteness, unchanged, LoRA merge.

`load_pair` is the sequential reader (similarity, tests); the streaming pipeline (stream.py)
makes the same checks on the device with `base_finite` and `tuned_status`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import NonFiniteError
from ..io.adapter import merge_lora
from ..types import LayerPair


@dataclass
class Loaded:
    """A pair read from disk: base and tuned matrices on the CPU (None when unchanged)."""

    pair: LayerPair
    w0: torch.Tensor | None  # (m, n) stored dtype
    wt: torch.Tensor | None  # (m, n) stored dtype, or float64 for merged LoRA
    status: str  # scanned | unchanged | nonfinite
    dtype: str


def load_pair(pair: LayerPair, read: Callable, allow_nonfinite: bool) -> Loaded:
    """Read base and tuned tensors of one pair; merge LoRA factors; detect unchanged / non-finite."""
    w0 = read(pair.base)
    if not base_finite(pair, w0, allow_nonfinite):
        return Loaded(pair, None, None, "nonfinite", pair.base.dtype)
    if pair.lora is not None:
        wt = merge_lora(w0, pair.lora, read)
    elif pair.tuned == pair.base:
        return Loaded(pair, None, None, "unchanged", pair.base.dtype)
    else:
        wt = read(pair.tuned)
    status = tuned_status(pair, w0, wt, allow_nonfinite)
    if status != "scanned":
        return Loaded(pair, None, None, status, pair.base.dtype)
    return Loaded(pair, w0, wt, "scanned", pair.base.dtype)


def base_finite(pair: LayerPair, w0: torch.Tensor, allow_nonfinite: bool) -> bool:
    """False when the base holds NaN or Inf and that is allowed (the layer is skipped); raises
    when it is not allowed."""
    if all_finite(w0):
        return True
    if not allow_nonfinite:
        raise NonFiniteError(f"base tensor {pair.name!r} in {pair.base.path} contains NaN or "
                             f"Inf (use --allow-nonfinite to skip such layers)")
    return False


def tuned_status(pair: LayerPair, w0: torch.Tensor, wt: torch.Tensor, allow_nonfinite: bool) -> str:
    """scanned | unchanged (bit-identical to the base) | nonfinite (allowed NaN / Inf; raises
    when not allowed), for a tuned matrix (LoRA already merged) against its finite base."""
    if not all_finite(wt):
        if not allow_nonfinite:
            raise NonFiniteError(f"tuned tensor {pair.name!r} in {pair.tuned_path} contains NaN or Inf "
                                 f"(use --allow-nonfinite to skip such layers)")
        return "nonfinite"
    if wt.dtype == w0.dtype and torch.equal(wt, w0):
        return "unchanged"
    return "scanned"


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t: one float64 sum (NaN and Inf propagate through it); only a sum that
    is not finite, which also overflow of huge finite float64 values gives, is checked again
    element by element."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return True
    return bool(torch.isfinite(t).all())
