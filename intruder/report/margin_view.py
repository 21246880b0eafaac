"""Margin view: figures and an HTML section for how close each matrix is to producing intruders.

Figures return `matplotlib.figure.Figure` (built without pyplot, like intruder.report.plots);
they only draw the numbers the scan stored (LayerResult.margin and .update_shape, see
intruder.spectral.margin).

    from intruder.report.margin_view import margin_section
    write_html(report, "audit.html", extra=[margin_section(report)])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

from ..provenance import classify_layer, provenance, verdict_line
from ..spectral.margin import margin_line, margin_summary
from ..types import LayerResult, ScanReport
from .page import Figures, Section, escape, table_html
from .plots import new_figure

Reports = Union[ScanReport, Mapping[str, ScanReport]]
KIND_COLOR = {"low-rank": "#d62728", "dense": "#1f77b4", "precision-only": "#7f7f7f"}
SERIES_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                 "#17becf")


def _as_mapping(reports: Reports) -> dict[str, ScanReport]:
    if isinstance(reports, ScanReport):
        import os

        return {os.path.basename(reports.tuned.path.rstrip("/")) or reports.tuned.path: reports}
    return dict(reports)


def _delta_sv(layer: LayerResult) -> list[float]:
    """The singular values of dW = Wt - W0 stored with the scan ([] when not recorded)."""
    return [float(s) for s in layer.update_shape.sv] if layer.update_shape is not None else []


def margin_points(report: ScanReport) -> list[tuple[str, float, float, str]]:
    """(name, novel_strength, min_max_cos, provenance class) per scanned matrix with margins."""
    out = []
    for l in report.layers:
        if l.status != "scanned":
            continue
        if l.margin is None:
            continue
        low, novel = l.margin.min_max_cos, l.margin.novel_strength
        if low is None or novel is None:
            continue
        out.append((l.name, novel, low, classify_layer(l).kind))
    return out


def margin_scatter(reports: Reports, color_by: str | None = None):
    """Each matrix: novel strength (x, log) against its lowest max|cos| (y). The count at epsilon
    switches on below the horizontal line; a new direction enters the top-k near x = 1.

    One report: colours by provenance class (low-rank / dense). Several: one colour per report
    (color_by='report'), to put a LoRA and a full fine-tune side by side."""
    reps = _as_mapping(reports)
    color_by = color_by or ("report" if len(reps) > 1 else "kind")
    fig = new_figure(6.2, 4.2)
    ax = fig.add_subplot()
    eps = next(iter(reps.values())).config.epsilon
    xs_all = []
    for i, (label, rep) in enumerate(reps.items()):
        pts = margin_points(rep)
        if color_by == "report":
            xs = [max(p[1], 1e-6) for p in pts]
            ax.scatter(xs, [p[2] for p in pts], s=14, alpha=0.75,
                       color=SERIES_COLORS[i % len(SERIES_COLORS)], label=f"{label} ({len(pts)})")
            xs_all += xs
        else:
            for kind, col in KIND_COLOR.items():
                sel = [p for p in pts if p[3] == kind]
                if sel:
                    xs = [max(p[1], 1e-6) for p in sel]
                    ax.scatter(xs, [p[2] for p in sel], s=14, alpha=0.75, color=col,
                               label=f"{kind} update ({len(sel)})")
                    xs_all += xs
    ax.set_xscale("log")
    ax.axhline(eps, color="k", lw=1, ls="--")
    ax.text(ax.get_xlim()[0] if xs_all else 1e-3, eps, f" epsilon {eps:g}: intruders below",
            va="bottom", fontsize=8)
    ax.axvline(1.0, color="#555", lw=1, ls=":")
    ax.set_xlabel("novel strength ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0)")
    ax.set_ylabel("lowest max|cos| (first-intruder epsilon)")
    ax.set_ylim(0, 1.03)
    ax.grid(alpha=0.3)
    if xs_all:
        ax.legend(fontsize=8, loc="lower left")
    ax.set_title("Intruder margin per matrix", fontsize=10)
    return fig


def delta_spectra(report: ScanReport, names: Sequence[str] | None = None, max_layers: int = 6):
    """Singular values of dW = Wt - W0 (log scale) with the storage rounding floor (dashed):
    a LoRA update falls off a cliff at its rank; a full fine-tune's does not."""
    layers = [l for l in report.layers if l.status == "scanned" and _delta_sv(l)]
    if names is not None:
        layers = [l for l in layers if l.name in set(names)]
    layers = layers[:max_layers]
    fig = new_figure(6.2, 4.0)
    ax = fig.add_subplot()
    for i, l in enumerate(layers):
        us = l.update_shape  # set: _delta_sv(l) is not empty
        sv = [max(s, 1e-30) for s in _delta_sv(l)]
        col = SERIES_COLORS[i % len(SERIES_COLORS)]
        ax.plot(range(1, len(sv) + 1), sv, marker=".", ms=3, lw=1, color=col,
                label=f"{_short(l.name)} (rank {us.rank if us is not None else None})")
        if us is not None and us.floor:
            ax.axhline(us.floor, color=col, lw=0.8, ls="--", alpha=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("index i of the singular value of dW")
    ax.set_ylabel("sigma_i(Wt - W0)")
    ax.grid(alpha=0.3)
    if layers:
        ax.legend(fontsize=7)
    ax.set_title("Spectrum of the update (dashed: storage rounding floor)", fontsize=10)
    return fig


def _short(name: str, n: int = 40) -> str:
    name = name[: -len(".weight")] if name.endswith(".weight") else name
    return name if len(name) <= n else "..." + name[-(n - 3):]


def margin_rows(report: ScanReport, limit: int = 25) -> list[list[object]]:
    """The matrices closest to a first intruder: (name, lowest max|cos|, cos margin, novel
    strength, ||dW||_2/sigma_k, stable rank of dW, rank of dW, class)."""
    keyed: list[tuple[tuple[float, float], list[object]]] = []  # (sort key, row)
    eps = report.config.epsilon
    for l in report.layers:
        if l.status != "scanned":
            continue
        if l.margin is None or l.margin.min_max_cos is None:
            continue
        low, novel = l.margin.min_max_cos, l.margin.novel_strength
        us = l.update_shape
        keyed.append(((low, -(novel or 0.0)),
                      [l.name, low, low - eps, novel, l.delta_norm_rel,
                       us.stable_rank if us is not None else None,
                       us.rank if us is not None else None, classify_layer(l).kind]))
    keyed.sort(key=lambda kr: kr[0])  # closest first; among ties the strongest novel direction
    return [row for _, row in keyed[:limit]]


def margin_section_html(report: ScanReport, dpi: int = 100) -> str:
    """HTML for the margin view of one scan (figures inline as PNG; strings escaped)."""
    fig = Figures(dpi)
    eps = report.config.epsilon
    k = report.config.top_k
    m = margin_summary(report.layers, eps)
    p = provenance(report)
    parts = [f'<p class="note">{escape(margin_line(m))}</p>' if m.get("layers") else
             '<p class="note">No scanned matrices carry margin measures.</p>']
    if m.get("layers"):
        parts.append(fig(margin_scatter(report), "margin scatter",
                         f"Each changed matrix: how strong the part of its update outside the "
                         f"base's top-{k} subspace is, relative to the base's {k}-th singular value "
                         f"(x), against its lowest max|cos| (y), which is the epsilon at which its "
                         f"first intruder would appear. Below the dashed line: intruders at "
                         f"epsilon {eps:g}. A concentrated new direction enters the top-{k} near "
                         f"x = 1. Colour: the provenance class of the update."))
        rows = margin_rows(report)
        parts.append(table_html(["matrix", "lowest max|cos|", f"margin to {eps:g}",
                                 "novel strength", "||dW||_2/sigma_k", "stable rank dW",
                                 "rank dW", "update"],
                                [[r[0]] + r[1:] for r in rows], num=(1, 2, 3, 4, 5, 6)))
    parts.append("<h3>Update shape (provenance; one input of the verdict above)</h3>"
                 f"<p><b>{escape(verdict_line(p))}</b></p>"
                 + "<ul>" + "".join(f"<li>{escape(e)}</li>" for e in p.evidence) + "</ul>")
    lr = [l.name for l in p.layers if l.kind in ("low-rank", "dense")]
    if lr:
        parts.append(fig(delta_spectra(report, lr[:6]), "update spectra",
                         "Singular values of Wt - W0 for the first changed matrices; dashed: the "
                         "rounding-noise floor of the storage dtype. The rank is the number of "
                         "values above it; LoRA shows a cliff at its rank."))
    return "".join(parts)


def margin_section(report: ScanReport, dpi: int = 100):
    """The margin view as an html.Section for write_html(..., extra=[...])."""

    return Section("Intruder margin and provenance", margin_section_html(report, dpi), "margin")
