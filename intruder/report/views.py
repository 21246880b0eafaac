"""What the audit shows, derived from a ScanReport: layer/module layout, grids, the epsilon sweep,
where intruders concentrate and which layers to draw. Pure Python (no numpy, pandas or matplotlib),
so plots only draw what these functions return.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..types import SWEEP_EPSILONS, LayerResult, ScanReport

_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() accepts other scripts' digits
_SUFFIX = (".weight",)


@dataclass(frozen=True)
class NameParts:
    """A tensor name split into its stack ('model.layers'), block index and module path."""

    stack: str  # components before the first numeric one ('' when the name has none)
    layer: int | None  # the first numeric component, or None (embeddings, heads ...)
    module: str  # components after it, later numbers replaced by '*' (experts collapse)


def split_name(name: str) -> NameParts:
    """Split any architecture's tensor name by its first purely numeric component.

    'model.layers.12.mlp.up_proj.weight' -> ('model.layers', 12, 'mlp.up_proj');
    'model.layers.3.mlp.experts.7.up_proj.weight' -> ('model.layers', 3, 'mlp.experts.*.up_proj');
    'lm_head.weight' -> ('', None, 'lm_head').
    """
    base = name
    for s in _SUFFIX:
        if base.endswith(s) and len(base) > len(s):
            base = base[: -len(s)]
    parts = base.split(".")
    for i, p in enumerate(parts):
        if _DIGITS.fullmatch(p):
            rest = ["*" if _DIGITS.fullmatch(q) else q for q in parts[i + 1:]]
            return NameParts(".".join(parts[:i]), int(p), ".".join(rest) or "(block)")
    return NameParts("", None, base)


def scanned(report: ScanReport) -> list[LayerResult]:
    return [l for l in report.layers if l.status == "scanned"]


def min_cos(layer: LayerResult) -> float | None:
    return min(layer.max_cos) if layer.max_cos else None


# ------------------------------------------------------------------------------------------------
# Layer x module grid
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """Rows are blocks (stack, layer), columns modules; a cell is None where no matrix exists."""

    rows: tuple[str, ...]  # row labels
    cols: tuple[str, ...]  # module paths
    counts: tuple[tuple[int | None, ...], ...]  # intruders per cell (summed over experts)
    min_cos: tuple[tuple[float | None, ...], ...]  # lowest max|cos| per cell (scanned only)
    matrices: tuple[tuple[int, ...], ...]  # matrices per cell (all statuses)


def layer_module_grid(report: ScanReport) -> Grid:
    """Intruder counts and the lowest max|cos| per (block, module) cell, in checkpoint order."""
    parts = [(l, split_name(l.name)) for l in report.layers]
    stacks: list[str] = []
    for _, p in parts:
        if p.layer is not None and p.stack not in stacks:
            stacks.append(p.stack)
    multi = len(stacks) > 1
    row_keys: list[tuple[int, int]] = []
    row_label: dict[tuple[int, int], str] = {}
    cols: list[str] = []
    cells: dict[tuple[tuple[int, int], str], list[LayerResult]] = {}
    for l, p in parts:
        if p.layer is None:
            key = (len(stacks), 0)  # one row for everything outside numbered blocks, last
            label = "other"
        else:
            key = (stacks.index(p.stack), p.layer)
            label = f"{p.stack} {p.layer}" if multi else str(p.layer)
        if key not in row_label:
            row_keys.append(key)
            row_label[key] = label
        if p.module not in cols:
            cols.append(p.module)
        cells.setdefault((key, p.module), []).append(l)
    row_keys.sort()
    counts, mins, mats = [], [], []
    for rk in row_keys:
        crow, mrow, nrow = [], [], []
        for c in cols:
            ls = cells.get((rk, c), [])
            sc = [l for l in ls if l.status == "scanned"]
            crow.append(sum(len(l.intruders) for l in sc) if ls else None)
            vals = [min(l.max_cos) for l in sc if l.max_cos]
            mrow.append(min(vals) if vals else None)
            nrow.append(len(ls))
        counts.append(tuple(crow))
        mins.append(tuple(mrow))
        mats.append(tuple(nrow))
    return Grid(tuple(row_label[k] for k in row_keys), tuple(cols), tuple(counts), tuple(mins),
                tuple(mats))


def module_totals(report: ScanReport) -> list[tuple[str, int, int, int]]:
    """(module, intruders, matrices with intruders, matrices scanned) per module, checkpoint order."""
    order: list[str] = []
    acc: dict[str, list[int]] = {}
    for l in report.layers:
        m = split_name(l.name).module
        if m not in acc:
            order.append(m)
            acc[m] = [0, 0, 0]
        if l.status == "scanned":
            acc[m][0] += len(l.intruders)
            acc[m][1] += 1 if l.intruders else 0
            acc[m][2] += 1
    return [(m, acc[m][0], acc[m][1], acc[m][2]) for m in order]


# ------------------------------------------------------------------------------------------------
# max|cos| distribution and the epsilon sweep
# ------------------------------------------------------------------------------------------------


def all_max_cos(report: ScanReport) -> list[float]:
    """Every top-k tuned vector's max|cos| over all scanned matrices (the decision value)."""
    return [c for l in scanned(report) for c in l.max_cos]


def sweep(report: ScanReport, grid: Sequence[float] = SWEEP_EPSILONS) -> list[tuple[float, int, int]]:
    """(epsilon, intruders, matrices with at least one) for each epsilon, from the stored max|cos|.

    Same rule as the scan: a vector is an intruder iff max|cos| < epsilon (strict)."""
    out = []
    layers = scanned(report)
    for e in grid:
        per = [sum(1 for c in l.max_cos if c < e) for l in layers]
        out.append((float(e), sum(per), sum(1 for n in per if n)))
    return out


def first_intruder_epsilon(report: ScanReport) -> float | None:
    """Any epsilon above this value flags at least one vector (the lowest max|cos| of all)."""
    vals = all_max_cos(report)
    return min(vals) if vals else None


# ------------------------------------------------------------------------------------------------
# Which layers to draw
# ------------------------------------------------------------------------------------------------


def most_affected(report: ScanReport, n: int = 3) -> list[LayerResult]:
    """Layers with the most intruders, ties broken by the lowest max|cos|; when no layer has an
    intruder, the layers closest to having one (lowest max|cos|)."""
    layers = [l for l in scanned(report) if l.max_cos]
    layers.sort(key=lambda l: (-len(l.intruders), min_cos(l), l.name))
    return layers[:n]


def clean_layer(report: ScanReport, exclude: Sequence[str] = ()) -> LayerResult | None:
    """A scanned layer without intruders whose top vectors stayed closest to the base."""
    cands = [l for l in scanned(report) if l.max_cos and not l.intruders and l.name not in exclude]
    if not cands:
        return None
    return max(cands, key=lambda l: (min_cos(l), l.name))


def spectra_layers(report: ScanReport, n: int = 6) -> list[LayerResult]:
    """Flagged layers (most intruders first); if none, the three closest to a first intruder."""
    flagged = [l for l in most_affected(report, n) if l.intruders]
    if flagged:
        return flagged
    return most_affected(report, 3)


# ------------------------------------------------------------------------------------------------
# Where the intruders are (the verdict itself: intruder/report/verdict.py)
# ------------------------------------------------------------------------------------------------


def _layer_span(layers: Sequence[int]) -> str:
    a, b = min(layers), max(layers)
    return f"layer {a}" if a == b else f"layers {a}-{b}"


@dataclass(frozen=True)
class Concentration:
    stack: str  # e.g. 'model.layers'
    first: int  # block index range [first, last] of the main run of blocks with intruders
    last: int
    inside: int  # intruders in that range
    total: int  # intruders in the stack
    span: int  # number of block indices scanned in the stack (max - min + 1)

    @property
    def label(self) -> str:
        return _layer_span((self.first, self.last))

    @property
    def concentrated(self) -> bool:
        """The run holds at least half the intruders in at most 60% of the blocks."""
        return (self.span > 1 and 2 * self.inside >= self.total
                and (self.last - self.first + 1) <= 0.6 * self.span)


def concentration(report: ScanReport) -> Concentration | None:
    """Where the intruders sit, in the stack of blocks that holds most of them.

    Block indices that carry intruders are grouped into runs, allowing gaps of up to
    max(2, span // 8) clean blocks inside a run (span = scanned index range); the run with the
    most intruders is reported (ties: the earlier one). An isolated stray intruder far from the
    run does not widen it; `inside` says how many intruders the run holds."""
    per: dict[str, dict[int, int]] = {}
    seen: dict[str, list[int]] = {}
    for l in scanned(report):
        p = split_name(l.name)
        if p.layer is None:
            continue
        seen.setdefault(p.stack, []).append(p.layer)
        if l.intruders:
            per.setdefault(p.stack, {})
            per[p.stack][p.layer] = per[p.stack].get(p.layer, 0) + len(l.intruders)
    if not per:
        return None
    stack = max(per, key=lambda s: sum(per[s].values()))
    counts = per[stack]
    span = max(seen[stack]) - min(seen[stack]) + 1
    gap = max(2, span // 8)
    runs: list[list[int]] = []
    for i in sorted(counts):
        if runs and i - runs[-1][-1] <= gap + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    best = max(runs, key=lambda r: (sum(counts[i] for i in r), -r[0]))
    inside = sum(counts[i] for i in best)
    return Concentration(stack, best[0], best[-1], inside, sum(counts.values()), span)
