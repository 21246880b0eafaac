"""What a scan report must satisfy beyond its JSON Schema: the relations between fields.

The schema (intruder/report/schema.py) says which fields exist and their JSON types; a report
edited by hand, or damaged, can still pass it while saying something impossible: epsilon 1.5, a
top_k of 1e18, a matrix of shape [] or [-4, 32], an intruder at rank 999 of a top-2 spectrum, the
same intruder listed twice, arrays of different lengths for the same top-k vectors. Every command
that reads a report (`report`, `scale`) would then draw, or rescale, something that was never
measured. `validate_report` refuses the first such relation with one line naming the report file
and the field (`layers[3].intruders[0].index`).
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ReportError

MAX_TOP_K = 1 << 20  # more singular vectors than any matrix a scan can decompose has
MAX_DIM = 1 << 40
COS_SLACK = 1e-6  # |cos| computed in float64 may exceed 1 by rounding, never by this much
SIGMA_ORDER_RTOL = 1e-6  # singular values are stored in non-increasing order

# per-vector arrays of one layer: each has one entry per tested top-k vector when present
_PER_VECTOR = ("base_index", "sigma_tuned", "near_overlap", "top_overlap", "max_cos_right",
               "base_index_right")


class _Bad(Exception):
    def __init__(self, field: str, what: str):
        super().__init__(f"{field}: {what}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _config(c: dict[str, Any]) -> int:
    top_k = c["top_k"]
    if not _int(top_k) or not 1 <= top_k <= MAX_TOP_K:
        raise _Bad("config.top_k", f"{top_k} is outside 1..{MAX_TOP_K}")
    for i, e in enumerate(c["epsilon"]):
        if not _finite(e) or not 0.0 < e <= 1.0:
            raise _Bad(f"config.epsilon[{i}]", f"{e} is outside (0, 1] (a threshold on |cos|)")
    return top_k


def _layer(l: dict[str, Any], where: str, top_k: int) -> None:  # noqa: E741 (l: a layer)
    shape = l["shape"]
    if len(shape) != 2:
        raise _Bad(f"{where}.shape", f"{shape} is not the shape of a matrix (two dimensions)")
    for d in shape:
        if not _int(d) or not 1 <= d <= MAX_DIM:
            raise _Bad(f"{where}.shape", f"{shape} holds a dimension outside 1..{MAX_DIM}")
    m, n = shape
    kmax = min(top_k, m, n)  # top-k vectors a scan of this matrix can test
    cos = l["max_cos"]
    k = len(cos)
    if k > kmax:
        raise _Bad(f"{where}.max_cos", f"{k} values for at most {kmax} tested vectors "
                                       f"(top_k {top_k}, shape {m}x{n})")
    for j, c in enumerate(cos):
        if not _finite(c) or not 0.0 <= c <= 1.0 + COS_SLACK:
            raise _Bad(f"{where}.max_cos[{j}]", f"{c} is not a |cos| in [0, 1]")
    for key in _PER_VECTOR:
        arr = l.get(key)
        if arr and len(arr) != k:
            raise _Bad(f"{where}.{key}", f"{len(arr)} values where max_cos has {k}")
    for key in ("base_index", "base_index_right"):
        for j, b in enumerate(l.get(key) or ()):
            if not _int(b) or not 0 <= b < max(m, n):
                raise _Bad(f"{where}.{key}[{j}]", f"{b} is not a base vector of a {m}x{n} matrix")
    for key in ("sigma_tuned", "sigma_base"):
        sig = l.get(key) or []
        for j, s in enumerate(sig):
            if not _finite(s) or s < 0:
                raise _Bad(f"{where}.{key}[{j}]", f"{s} is not a singular value (finite, >= 0)")
            if j and s > sig[j - 1] + SIGMA_ORDER_RTOL * sig[0]:
                raise _Bad(f"{where}.{key}[{j}]", f"{s} is above the value before it; singular "
                                                  f"values are in non-increasing order")
        if len(sig) > min(m, n):
            raise _Bad(f"{where}.{key}", f"{len(sig)} values for a {m}x{n} matrix")
    intr = l["intruders"]
    if intr and l.get("status", "scanned") != "scanned":
        raise _Bad(f"{where}.intruders", f"listed for a layer whose status is {l['status']!r}")
    seen = set()
    for j, it in enumerate(intr):
        idx = it["index"]
        top = k or kmax
        if not 0 <= idx < top:
            raise _Bad(f"{where}.intruders[{j}].index",
                       f"{idx} is outside the top-{top} spectrum the layer records "
                       f"(ranks 0..{top - 1})")
        if idx in seen:
            raise _Bad(f"{where}.intruders[{j}].index", f"rank {idx} is listed twice")
        seen.add(idx)
        b = it["base_index"]
        if not 0 <= b < max(m, n):
            raise _Bad(f"{where}.intruders[{j}].base_index",
                       f"{b} is not a base vector of a {m}x{n} matrix")
        c = it["max_cos"]
        if not 0.0 <= c <= 1.0 + COS_SLACK:
            raise _Bad(f"{where}.intruders[{j}].max_cos", f"{c} is not a |cos| in [0, 1]")
        if not _finite(it["sigma"]) or it["sigma"] < 0:
            raise _Bad(f"{where}.intruders[{j}].sigma", f"{it['sigma']} is not a singular value")
    for key, v in (l.get("counts_by_epsilon") or {}).items():
        _count(v, kmax, f"{where}.counts_by_epsilon[{key!r}]")


def _count(v: Any, most: int, field: str) -> None:
    if not _int(v) or not 0 <= v <= most:
        raise _Bad(field, f"{v} is not a count in 0..{most}")


def _summary(s: dict[str, Any], layers: list[dict[str, Any]], top_k: int) -> None:
    _count(s["layers_scanned"], len(layers), "summary.layers_scanned")
    _count(s["total_intruders"], top_k * max(len(layers), 1), "summary.total_intruders")


def validate_report(doc: dict[str, Any], source: str = "report") -> None:
    """Refuse a schema-valid report whose fields contradict each other (ReportError, one line
    naming `source` and the field)."""
    try:
        top_k = _config(doc["config"])
        layers = doc["layers"]
        for i, layer in enumerate(layers):
            _layer(layer, f"layers[{i}]", top_k)
        _summary(doc["summary"], layers, top_k)
    except _Bad as exc:
        raise ReportError(f"{source}: {exc}") from None


__all__ = ["MAX_TOP_K", "validate_report"]
