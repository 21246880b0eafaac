"""Plots of an alpha sweep (`intruder scale --eval`). Plotting only: every number arrives computed.

matplotlib is imported inside the functions (Agg backend, no display needed); figures are written
atomically as PNG.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from ..io.atomic import atomic_file


@dataclass(frozen=True)
class SweepPoint:
    """One evaluated model of the sweep."""

    label: str  # "base", "tuned", "alpha=0.5"
    role: str  # base | tuned | scaled
    alpha: float | None  # None for base; 1.0 for tuned
    x: float  # pre-training metric (trade-off plot) or alpha (metric plot)
    y: float  # task metric (trade-off plot) or the metric (metric plot)


_STYLE = {"base": dict(marker="s", color="#2b7bba", s=90, zorder=4),
          "tuned": dict(marker="*", color="#d7301f", s=180, zorder=4),
          "scaled": dict(marker="o", color="#444444", s=45, zorder=3)}


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(6.4, 4.8), dpi=120)


def _save(plt, fig, path: str, note: str = "") -> None:
    if note:
        fig.text(0.01, 0.005, note, fontsize=6, color="#555555", va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.03 * (note.count("\n") + 1) if note else 0, 1, 1))
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)


def _wrap(label: str, width: int = 48) -> str:
    """An axis label wrapped to the figure (long metric names and protocols ran off the edge)."""
    return "\n".join(textwrap.fill(line, width) for line in label.split("\n"))


def _alpha(p: SweepPoint) -> float:
    """A scaled or tuned point's alpha (only the base point has none)."""
    if p.alpha is None:
        raise ValueError(f"sweep point {p.label!r} ({p.role}) has no alpha")
    return p.alpha


def plot_tradeoff(points: Sequence[SweepPoint], x_label: str, y_label: str, title: str,
                  path: str, note: str = "") -> str:
    """Pre-training metric (x) against task metric (y): one point per alpha joined in alpha
    order, base and tuned marked. Returns `path`."""
    plt, (fig, ax) = _figure()
    scaled = sorted((p for p in points if p.role == "scaled"), key=_alpha)
    path_pts = sorted((p for p in points if p.role in ("scaled", "tuned")), key=_alpha)
    if len(path_pts) > 1:  # the sweep's path, alpha ascending, ending at the tuned model
        ax.plot([p.x for p in path_pts], [p.y for p in path_pts], "-", color="#999999", lw=1,
                zorder=2)
    for role, name in (("scaled", "rescaled (alpha)"), ("base", "base"),
                       ("tuned", "tuned (alpha = 1)")):
        pts = [p for p in points if p.role == role]
        if pts:
            ax.scatter([p.x for p in pts], [p.y for p in pts], label=name, **_STYLE[role])
    for p in scaled + [p for p in points if p.role == "tuned"]:
        ax.annotate(f"α={p.alpha:g}", (p.x, p.y), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    ax.set_xlabel(_wrap(x_label, 70))
    ax.set_ylabel(_wrap(y_label))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(plt, fig, path, note)
    return path


def plot_metric_vs_alpha(points: Sequence[SweepPoint], y_label: str, title: str,
                         path: str, note: str = "") -> str:
    """One metric against alpha (when the sweep has no second metric to trade against); base
    and tuned drawn as horizontal reference lines. Returns `path`."""
    plt, (fig, ax) = _figure()
    scaled = sorted((p for p in points if p.role == "scaled"), key=lambda p: p.x)
    if scaled:
        ax.plot([p.x for p in scaled], [p.y for p in scaled], "o-", color="#444444",
                label="rescaled", zorder=3)
    for role, style, name in (("base", "--", "base"), ("tuned", ":", "tuned (alpha = 1)")):
        for p in points:
            if p.role == role:
                ax.axhline(p.y, ls=style, color=_STYLE[role]["color"], label=name)
                break
    ax.set_xlabel("alpha (intruder singular values scaled by alpha)")
    ax.set_ylabel(_wrap(y_label))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(plt, fig, path, note)
    return path
