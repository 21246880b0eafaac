"""Track / compare view: figures, an HTML section and a standalone HTML page.

    from intruder.report.track_view import track_section, write_track_html
    write_track_html(track_report, "track.html")                 # a page of its own
    write_html(scan_report, "audit.html", extra=[track_section(track_report)])  # inside an audit
"""

from __future__ import annotations

import os

from ..io.atomic import write_text
from ..provenance import verdict_line_dict
from ..track import PERSIST_COS, summaries
from .margin_view import SERIES_COLORS, margin_scatter
from .page import Figures, Section, asset, csp_hash, escape, table_html
from .plots import new_figure
from .table import BOUND_NOTE, bound_count, source_text


def _xs(tr) -> tuple[list[int], list[str]]:
    return list(range(len(tr.entries))), [e.label for e in tr.entries]


def track_counts(tr):
    """Intruders along the checkpoints: against the base (solid) and against the previous step
    (dashed, track only), one colour per epsilon."""
    rows = summaries(tr)
    x, labels = _xs(tr)
    fig = new_figure(max(5.0, 1.2 * len(x) + 2.5), 3.8)
    ax = fig.add_subplot()
    for i, e in enumerate(sorted(set(tr.config.epsilons))):
        key = format(e, "g")
        col = SERIES_COLORS[i % len(SERIES_COLORS)]
        ax.plot(x, [r["counts_by_epsilon"].get(key, 0) for r in rows], marker="o", color=col,
                label=f"vs base, epsilon {key}")
        if tr.mode == "track":
            prev = [r["vs_previous"]["counts_by_epsilon"].get(key, 0) if r["vs_previous"] else
                    r["counts_by_epsilon"].get(key, 0) for r in rows]
            ax.plot(x, prev, marker="x", ls="--", color=col, label=f"vs previous, epsilon {key}")
    from matplotlib.ticker import MaxNLocator

    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("intruders (all matrices)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Intruders along the sequence" if tr.mode == "track" else
                 "Intruders per fine-tune", fontsize=10)
    return fig


def track_margin(tr):
    """Lowest max|cos| (left axis) and largest novel strength (right axis, log) per checkpoint."""
    rows = summaries(tr)
    x, labels = _xs(tr)
    fig = new_figure(max(5.0, 1.2 * len(x) + 2.5), 3.6)
    ax = fig.add_subplot()
    ax.plot(x, [r["min_max_cos"] if r["min_max_cos"] is not None else float("nan") for r in rows],
            marker="o", color=SERIES_COLORS[0], label="lowest max|cos|")
    ax.axhline(tr.config.epsilon, color="k", ls="--", lw=1)
    ax.set_ylim(0, 1.03)
    ax.set_ylabel("lowest max|cos| (first-intruder epsilon)")
    ax2 = ax.twinx()
    ax2.plot(x, [r["novel_strength_max"] or float("nan") for r in rows], marker="s",
             color=SERIES_COLORS[1], label="max novel strength")
    ax2.set_yscale("log")
    ax2.axhline(1.0, color=SERIES_COLORS[1], ls=":", lw=1)
    ax2.set_ylabel("max novel strength (log)")
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.grid(alpha=0.3)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    ax.set_title("Margin to the first intruder", fontsize=10)
    return fig


def persistence_bars(tr):
    """Per step: persistent and new intruders (stacked up), gone ones (down)."""
    rows = summaries(tr)
    x, labels = _xs(tr)
    fig = new_figure(max(5.0, 1.2 * len(x) + 2.5), 3.4)
    ax = fig.add_subplot()
    pers = [r.get("persistent", 0) for r in rows]
    new = [r.get("new", 0) for r in rows]
    gone = [-r.get("gone", 0) for r in rows]
    ax.bar(x, pers, color="#7f7f7f", label="persistent")
    ax.bar(x, new, bottom=pers, color=SERIES_COLORS[0], label="new")
    ax.bar(x, gone, color=SERIES_COLORS[1], label="gone (below 0)")
    ax.axhline(0, color="k", lw=0.8)
    ax.margins(y=0.12)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylabel(f"intruders at epsilon {tr.config.epsilon:g}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    ax.set_title("Which intruders persist from step to step", fontsize=10)
    return fig


def track_section_html(tr, dpi: int = 100) -> str:
    """HTML of the track / compare view: table, figures, per-checkpoint verdicts."""
    fig = Figures(dpi)
    rows = summaries(tr)
    eps_keys = [format(e, "g") for e in sorted(set(tr.config.epsilons))]
    headers = ["checkpoint", "input"] + [f"intruders @{k}" for k in eps_keys] + [
        "lowest max|cos|", "max novel strength", "verdict"]
    if tr.mode == "track":
        headers += ["vs previous @" + eps_keys[0] if eps_keys else "vs previous", "persistent",
                    "new", "gone"]
    body = []
    for e, r in zip(tr.entries, rows):
        row = [e.label, r["kind"]] + [r["counts_by_epsilon"].get(k, 0) for k in eps_keys] + [
            r["min_max_cos"], r["novel_strength_max"], r["verdict"]["label"]]
        if tr.mode == "track":
            vp = r["vs_previous"]
            row += [vp["counts_by_epsilon"].get(eps_keys[0], 0) if vp else "(= vs base)",
                    r["persistent"], r["new"], r["gone"]]
        body.append(row)
    n_eps = len(eps_keys)
    num = tuple(range(2, 4 + n_eps)) + ((6 + n_eps, 7 + n_eps, 8 + n_eps, 9 + n_eps)
                                        if tr.mode == "track" else ())
    parts = [table_html(headers, body, num=num)]
    n_bound = bound_count([x for e in tr.entries for x in (e.vs_base, e.vs_previous)])
    if n_bound:
        parts.append(f'<p class="note">{n_bound} {escape(BOUND_NOTE)} (the lowest max|cos| '
                     f"may be one).</p>")
    parts.append(fig(track_counts(tr), "intruder counts per checkpoint",
                     "Intruder counts summed over all matrices (Algorithm 1, top-"
                     f"{tr.config.top_k} left vectors, max|cos| &lt; epsilon)."
                     + (" Dashed: each step measured against the step before it." if
                        tr.mode == "track" else "")))
    parts.append(fig(track_margin(tr), "margin per checkpoint",
                     "The lowest max|cos| over all matrices (the epsilon at which the first "
                     "intruder appears; dashed: the deciding epsilon) and the largest novel "
                     "strength (a new direction enters the top-k near 1)."))
    if tr.mode == "track":
        parts.append(fig(persistence_bars(tr), "intruder persistence",
                         f"Intruders against the base at each step that match one of the step "
                         f"before (|cos| &ge; {PERSIST_COS:g}: persistent) or none (new), and "
                         f"those of the step before that no longer appear (gone)."))
    parts.append(fig(margin_scatter({e.label: e.vs_base for e in tr.entries}),
                     "margin scatter per checkpoint",
                     "Every changed matrix of every checkpoint: novel strength against lowest "
                     "max|cos|, one colour per checkpoint."))
    items = []
    for e, r in zip(tr.entries, rows):
        ev = "".join(f"<li>{escape(x)}</li>" for x in r["verdict"]["evidence"])
        warn = "".join(f'<div class="warning">{escape(w)}</div>' for w in r["warnings"])
        items.append(f"<li><b>{escape(e.label)}</b> (<code>{escape(e.path)}</code>): "
                     f"<b>{escape(r['verdict']['wording'])}</b> "
                     f"({escape(verdict_line_dict(r['provenance']))})<ul>{ev}</ul>{warn}</li>")
    parts.append("<h3>Verdicts</h3><ul>" + "".join(items) + "</ul>")
    return "".join(parts)


def track_section(tr, dpi: int = 100):
    """The view as an html.Section for write_html(..., extra=[...])."""

    title = "Continual-learning track" if tr.mode == "track" else "Fine-tunes compared"
    return Section(title, track_section_html(tr, dpi), tr.mode)


def _source(info) -> str:
    """'; content sha256 ...; hub org/name@rev commit ...' (plain text, escaped by the caller)."""
    text = source_text(info).strip()
    return f"; {text}" if text else ""


def render_track_html(tr, dpi: int = 100) -> str:
    """A standalone, self-contained page (same style and Content Security Policy as the audit)."""

    css = asset("audit.css")
    csp = (f"default-src 'none'; img-src data:; style-src {csp_hash(css)}; base-uri 'none'; "
           f"form-action 'none'")
    title = ("Intruder track: " if tr.mode == "track" else "Intruder comparison: ") + \
        ", ".join(e.label for e in tr.entries)
    prov = [("tool", f"intruder {tr.tool_version}"), ("command", tr.command),
            ("date (UTC)", tr.created), ("base", f"{tr.base.path} [{tr.base.kind}, "
                                                 f"fingerprint {tr.base.fingerprint}]"
                                                 f"{_source(tr.base)}"),
            ("time", f"{tr.seconds:.2f} s wall on {tr.device}")]
    kv = '<table class="kv">' + "".join(f"<tr><th>{escape(a)}</th><td>{escape(b)}</td></tr>"
                                        for a, b in prov) + "</table>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{css}</style></head><body>"
            f"<h1>{escape(title)}</h1>{kv}<section id=\"{escape(tr.mode)}\">"
            f"{track_section_html(tr, dpi)}</section>"
            "<footer>Self-contained report: no network access is needed or made.</footer>"
            "</body></html>\n")


def write_track_html(tr, path: str, dpi: int = 100) -> int:
    """Write the standalone page atomically; returns its size in bytes."""
    page = render_track_html(tr, dpi)
    write_text(os.fspath(path), page)
    return len(page.encode("utf-8"))
