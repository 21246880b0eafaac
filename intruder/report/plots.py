"""Matplotlib figures of a scan report. Each function returns a `matplotlib.figure.Figure`.

Figures are built without pyplot (no global state, no GUI backend: they render with Agg), so they
work the same in scripts, tests, notebooks (`display(fig)`) and the HTML writer. Plotting only
draws: the numbers come from `intruder.report.views` (and `similarity` / `scale_results`).
matplotlib is imported inside the functions so `import intruder` stays fast.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Union

from ..types import SWEEP_EPSILONS, ScanReport
from . import views

Reports = Union[ScanReport, Mapping[str, ScanReport]]
INTRUDER_COLOR = "#d62728"
BASE_COLOR = "#1f77b4"
TUNED_COLOR = "#ff7f0e"


def _plain_text(fn):
    """Draw every text literally: tensor names from checkpoints may contain '$', which
    matplotlib would otherwise parse as mathtext (and fail on when unbalanced)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return fn(*args, **kwargs)

    return wrapper


def new_figure(w: float, h: float):
    """A matplotlib Figure (w x h inches, constrained layout) on the Agg canvas, without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _as_mapping(reports: Reports) -> dict[str, ScanReport]:
    if isinstance(reports, ScanReport):
        import os

        p = reports.tuned.path.rstrip("/")
        return {_short(os.path.basename(p) or p): reports}
    return dict(reports)


def _short(s: str, n: int = 48) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3):]


def _wrap(s: str, width: int = 44, lines: int = 3) -> str:
    """Break a long dotted name over a few lines at '.', ' ' or '/' (a title keeps its start
    and its end); the middle is elided only beyond `lines` lines."""
    import re

    if "\n" in s:
        return "\n".join(_wrap(part, width, lines) for part in s.split("\n"))
    out, cur = [], ""
    for tok in re.findall(r"[^./ ]*[./ ]?", s):
        if cur and len(cur) + len(tok) > width:
            out.append(cur)
            cur = ""
        while len(tok) > width:
            out.append(tok[:width])
            tok = tok[width:]
        cur += tok
    if cur:
        out.append(cur)
    if len(out) > lines:
        out = out[: lines - 1] + ["..." + out[-1][-(width - 3):]]
    return "\n".join(out)


def to_png(fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (no timestamp or software tag, so output is reproducible)."""
    import warnings

    from matplotlib.text import Text

    for t in fig.findobj(Text):  # a file name that is not valid Unicode (a non-UTF-8 name, or
        text = t.get_text()  # any non-ASCII name under LANG=C) has no glyphs: shown escaped
        if any("\ud800" <= ch <= "\udfff" for ch in text):
            t.set_text(text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # a checkpoint-supplied name with control characters has no glyph; matplotlib would
        # print the raw name to stderr (the box drawn in its place is enough)
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


@_plain_text
def layer_module_heatmap(report: ScanReport, value: str = "count", annotate: bool | None = None):
    """Blocks (rows) x modules (columns): intruder counts (value='count') or the lowest max|cos|
    per cell (value='min_cos', the distance to a first intruder). Grey cells: no such matrix or
    nothing changed."""
    import numpy as np

    g = views.layer_module_grid(report)
    src = g.counts if value == "count" else g.min_cos
    if value == "count":  # unchanged matrices have a count (0) but no spectrum: keep them grey
        src = tuple(tuple(None if m is None else c for c, m in zip(cr, mr))
                    for cr, mr in zip(g.counts, g.min_cos))
    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in src], dtype=float)
    arr = arr.reshape(len(g.rows), len(g.cols))  # (blocks, modules)
    labels = [_short(c, 28) for c in g.cols]
    longest = max((len(x) for x in labels), default=4)
    fig = new_figure(min(14.0, 2.8 + 1.05 * len(g.cols)),
                  min(18.0, max(2.2, 0.9 + 0.27 * len(g.rows)) + 0.065 * longest + 0.6))
    ax = fig.add_subplot()
    ax.set_facecolor("#e6e6e6")
    eps = report.config.epsilon
    if value == "count":
        vmax = max(1.0, float(np.nanmax(arr)) if np.isfinite(arr).any() else 1.0)
        im = ax.imshow(np.ma.masked_invalid(arr), aspect="auto", cmap="Reds", vmin=0, vmax=vmax,
                       interpolation="nearest")
        label = f"intruders at epsilon {eps:g}"
    else:
        im = ax.imshow(np.ma.masked_invalid(arr), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                       interpolation="nearest")
        label = "lowest max|cos|"
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label(label)
    if value != "count":
        cb.ax.axhline(eps, color=INTRUDER_COLOR, lw=2)
    ax.set_xticks(range(len(g.cols)), labels, rotation=35, ha="right")
    step = max(1, len(g.rows) // 40)
    ax.set_yticks(range(0, len(g.rows), step), [g.rows[i] for i in range(0, len(g.rows), step)])
    ax.set_xlabel("module")
    ax.set_ylabel("block (layer index)")
    if annotate is None:
        annotate = len(g.rows) * len(g.cols) <= 400
    if annotate:
        for r in range(arr.shape[0]):
            for c in range(arr.shape[1]):
                v = arr[r, c]
                if np.isfinite(v):
                    txt = f"{int(v)}" if value == "count" else f"{v:.2f}"
                    dark = v > 0.6 * (im.norm.vmax or 1) if value == "count" else v < 0.45
                    ax.text(c, r, txt, ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
    title = "Intruder count per layer and module" if value == "count" else \
        "Closest approach to an intruder: lowest max|cos| per layer and module"
    ax.set_title(title, fontsize=10)
    return fig


@_plain_text
def module_bars(report: ScanReport):
    """Intruders per module type, labelled with how many of its matrices carry any."""
    rows = views.module_totals(report)
    fig = new_figure(7.5, max(2.0, 0.8 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    names = [_short(m, 36) for m, *_ in rows]
    counts = [n for _, n, _, _ in rows]
    ax.barh(range(len(rows)), counts, color=INTRUDER_COLOR)
    ax.set_yticks(range(len(rows)), names)
    ax.invert_yaxis()
    for i, (_, n, with_i, scanned) in enumerate(rows):
        ax.text(n, i, f"  {n}  (in {with_i} of {scanned} changed)", va="center", fontsize=8)
    ax.set_xlim(0, max(1, max(counts, default=0)) * 1.6)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"intruders at epsilon {report.config.epsilon:g}")
    ax.set_title("Intruders per module", fontsize=10)
    return fig


@_plain_text
def similarity_heatmaps(blocks: Sequence, clean: str | None = None, max_cols: int = 4):
    """|cos| of the top-k tuned singular vectors (rows) against the top-N base vectors (columns),
    one panel per SimilarityBlock. A row without a bright cell is an intruder (marked in red);
    `clean` names the panel shown for contrast."""
    import numpy as np

    blocks = list(blocks)
    n = max(1, len(blocks))
    cols = min(max_cols, n)
    rows = -(-n // cols)
    fig = new_figure(3.3 * cols + 0.8, 3.1 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    im = None
    for ax, b in zip(axes.flat, blocks):
        cos = np.asarray(b.cos, dtype=float)  # (k, N)
        im = ax.imshow(cos, vmin=0, vmax=1, cmap="magma", aspect="auto", interpolation="nearest")
        for j in b.intruders:
            ax.add_patch(_rect(j, cos.shape[1]))
        ax.set_xlabel(f"base {b.side} singular vector i (top {cos.shape[1]})", fontsize=8)
        ax.set_ylabel(f"tuned vector j (top {cos.shape[0]})", fontsize=8)
        kind = " (clean, for contrast)" if b.name == clean else \
            f" ({len(b.intruders)} intruder{'s' if len(b.intruders) != 1 else ''})"
        ax.set_title(_wrap(b.name, 44) + "\n" + kind.strip(" ()"), fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(blocks):]:
        ax.set_axis_off()
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.85).set_label("|cos(u_tuned_j, u_base_i)|")
    return fig


def _rect(row: int, width: int):
    from matplotlib.patches import Rectangle

    return Rectangle((-0.5, row - 0.5), width, 1, fill=False, ec="#00e5ff", lw=1.6)


@_plain_text
def max_cos_histogram(reports: Reports, bins: int = 40):
    """Distribution of every top-k vector's max|cos| (all changed matrices); epsilon marked."""
    import numpy as np

    reps = _as_mapping(reports)
    fig = new_figure(7.0, 3.4)
    ax = fig.add_subplot()
    edges = np.linspace(0, 1, bins + 1)
    for label, r in reps.items():
        vals = views.all_max_cos(r)
        if vals:
            ax.hist(vals, bins=edges, histtype="step" if len(reps) > 1 else "bar", lw=1.6,
                    label=f"{label} ({len(vals)} vectors)", alpha=1 if len(reps) > 1 else 0.85)
    eps = next(iter(reps.values())).config.epsilon if reps else 0.5
    ax.axvline(eps, color=INTRUDER_COLOR, ls="--", label=f"epsilon = {eps:g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("max|cos| of a top-k tuned vector against every base vector")
    ax.set_ylabel("vectors")
    ax.set_title("Distribution of max|cos| (left of the line: intruders)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return fig


@_plain_text
def epsilon_sweep(reports: Reports, grid: Sequence[float] = SWEEP_EPSILONS, log: bool = False):
    """Intruder count against epsilon, from the stored max|cos| (one line per report)."""
    reps = _as_mapping(reports)
    fig = new_figure(6.5, 3.6)
    ax = fig.add_subplot()
    for label, r in reps.items():
        sw = views.sweep(r, grid)
        ax.plot([e for e, _, _ in sw], [n for _, n, _ in sw], marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epsilon (intruder iff max|cos| < epsilon)")
    ax.set_ylabel("intruders (all matrices)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if log:
        ax.set_yscale("symlog", linthresh=1)
    ax.grid(alpha=0.3)
    ax.set_title("Intruder count against epsilon", fontsize=10)
    ax.legend(fontsize=8)
    return fig


@_plain_text
def spectra(report: ScanReport, names: Sequence[str] | None = None, max_cols: int = 3):
    """Top singular values of base and tuned per layer; intruders marked on the tuned spectrum."""
    by = {l.name: l for l in report.layers}
    layers = [by[n] for n in names] if names else views.spectra_layers(report)
    layers = [l for l in layers if l.sigma_tuned]
    n = max(1, len(layers))
    cols = min(max_cols, n)
    rows = -(-n // cols)
    fig = new_figure(3.6 * cols + 0.4, 2.8 * rows + 0.3)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, l in zip(axes.flat, layers):
        ax.plot(range(len(l.sigma_base)), l.sigma_base, marker=".", color=BASE_COLOR, label="base")
        ax.plot(range(len(l.sigma_tuned)), l.sigma_tuned, marker=".", color=TUNED_COLOR,
                label="tuned")
        for i in l.intruders:
            ax.plot([i.index], [i.sigma], "x", color=INTRUDER_COLOR, ms=9, mew=2)
            ax.annotate(f"{i.max_cos:.2f}", (i.index, i.sigma), fontsize=7, color=INTRUDER_COLOR,
                        xytext=(4, 4), textcoords="offset points")
        ax.margins(y=0.14)  # room for the intruder labels at the top
        ax.set_title(_wrap(l.name, 48), fontsize=8)
        ax.set_xlabel("rank", fontsize=8)
        ax.set_ylabel("singular value", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers):]:
        ax.set_axis_off()
    if layers:
        axes.flat[0].legend(fontsize=7, title="x: intruder (its max|cos|)", title_fontsize=7)
    return fig


@_plain_text
def tradeoff(table, x: str | None = None, y: str | None = None):
    """Scale sweep trade-off: pre-training metric (x) against task metric (y), one point per
    alpha, the base and the tuned model (alpha = 1) marked."""
    x = x or table.x_metric
    y = y or table.y_metric
    fig = new_figure(6.5, 4.4)
    ax = fig.add_subplot()
    has_tuned = any(p.role == "tuned" for p in table.points)
    pts = [p for p in table.points if p.get(x) is not None and p.get(y) is not None
           and not (has_tuned and p.role == "scaled" and p.alpha == 1.0)]  # same weights as tuned
    sweep_pts = sorted([p for p in pts if p.role in ("scaled", "tuned") and p.alpha is not None],
                       key=lambda p: p.alpha)
    if sweep_pts:
        ax.plot([p.get(x) for p in sweep_pts], [p.get(y) for p in sweep_pts], "-", color="#888",
                zorder=1)
    for p in pts:
        style = {"base": ("*", BASE_COLOR, 220), "tuned": ("s", TUNED_COLOR, 90)}.get(
            p.role, ("o", INTRUDER_COLOR, 50))
        ax.scatter([p.get(x)], [p.get(y)], marker=style[0], color=style[1], s=style[2], zorder=2)
        ax.annotate(p.label, (p.get(x), p.get(y)), fontsize=7, xytext=(5, 3),
                    textcoords="offset points")
    ax.margins(x=0.18, y=0.12)
    ax.set_xlabel(f"{x} (pre-training side)")
    ax.set_ylabel(f"{y} (task side)")
    ax.grid(alpha=0.3)
    ax.set_title("Rescaling intruders: forgetting against task performance", fontsize=10)
    return fig


@_plain_text
def counts_bar(labels: Sequence[str], counts: Sequence[float], ylabel: str = "intruders",
               title: str = ""):
    """A bar per label (e.g. intruder count per fine-tuning method or LoRA rank)."""
    fig = new_figure(max(4.0, 1.1 * len(labels) + 1.5), 3.4)
    ax = fig.add_subplot()
    ax.bar(range(len(labels)), counts, color=INTRUDER_COLOR)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    for i, c in enumerate(counts):
        ax.text(i, c, f"{c:g}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig


@_plain_text
def sequence_counts(reports: Mapping[str, ScanReport], epsilons: Sequence[float] = (0.5, 0.7, 0.9)):
    """Intruder counts along a sequence of checkpoints (continual learning), one line per epsilon."""
    labels = list(reports)
    fig = new_figure(max(5.0, 1.2 * len(labels) + 2), 3.6)
    ax = fig.add_subplot()
    for e in epsilons:
        ys = [views.sweep(reports[k], (e,))[0][1] for k in labels]
        ax.plot(range(len(labels)), ys, marker="o", label=f"epsilon {e:g}")
    from matplotlib.ticker import MaxNLocator

    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("intruders (all matrices)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Intruders along the sequence of fine-tunes", fontsize=10)
    return fig
