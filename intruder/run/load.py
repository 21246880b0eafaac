"""Reading one matrix pair for the per-matrix analysis: finiteness, unchanged, LoRA merge.

`load_pair` is the sequential reader (similarity, tests); the streaming pipeline (stream.py)
makes the same checks on the device with `all_finite`.
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
