"""The self-contained HTML audit: one file, CSS, JavaScript and figures inline, no network.

    from intruder.report.html import write_html
    write_html(report, "reports/audit.html", scale_results="out/scale-results.json")

Every string that comes from a checkpoint or the command line is HTML-escaped; a Content
Security Policy admits only the page's own inline style and script (by hash) and data: images,
so even a missed escape could not load or run anything.

Similarity heatmaps need the singular vectors, which the scan JSON does not keep; they are
recomputed from the checkpoints for a few layers (see intruder.report.similarity). `similarity`
is None (auto: when both checkpoints are still at their paths with the scanned fingerprints and
the chosen matrices are at most AUTO_MAX_DIM on their short side), True (required; errors are
raised) or False (left out).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import __version__
from ..errors import IntruderError, OutputError, ReportError
from ..io.atomic import write_text
from ..types import ScanReport, Verdict
from . import plots, views
from .margin_view import margin_section
from .page import Figures, Section, asset, csp_hash, escape, fmt_cell, table_html
from .scale_results import ScaleTable, load_scale_results, parse_scale_results
from .similarity import recompute_similarity
from .summary import summary
from .verdict import verdict_of

AUTO_MAX_DIM = 2048  # auto similarity: skip matrices whose short side is larger (CPU time)
MAX_INTRUDER_ROWS = 500
JS_MARKER = 'data-audit-js="ready"'  # set on <html> by the inline script once it has run


def _bytes(n: int) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.2f} {unit} ({n:,} bytes)"
    return f"{n} bytes"


@dataclass(frozen=True)
class AuditInfo:
    """What write_html put in the page (for the CLI's one-line summary)."""

    path: str
    bytes: int
    figures: int
    similarity: str  # what happened to the similarity heatmaps, in words


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def _header(report: ScanReport, v: Verdict) -> str:
    s = summary(report)
    title = f"Intruder audit: {os.path.basename(report.tuned.path.rstrip('/')) or report.tuned.path}"
    mm = s["min_max_cos"]
    energy = max((l.intruder_energy for l in views.scanned(report)), default=0.0)
    cards = [
        (s["total_intruders"], f"intruders at epsilon {report.config.epsilon:g}"),
        (f'{s["layers_with_intruders"]} / {s["layers_scanned"]}', "changed matrices with intruders"),
        (s["layers_unchanged"], "matrices bit-identical to base"),
        ("n/a" if mm is None else f"{mm:.3f}", "lowest max|cos| (1 = aligned)"),
        (f"{100 * energy:.1f}%", "largest intruder energy share (top-k sigma^2)"),
        (f"{report.seconds:.1f} s", f"scan wall time on {report.device}"),
    ]
    card_html = "".join(f'<div class="card"><div class="v">{escape(a)}</div>'
                        f'<div class="k">{escape(b)}</div></div>' for a, b in cards)
    details = "".join(f"<li>{escape(d)}</li>" for d in v.evidence)
    return (f"<header><h1>{escape(title)}</h1>"
            f'<p class="sub">tuned <code>{escape(report.tuned.path)}</code>'
            f"{_source_note(report.tuned)} against base "
            f"<code>{escape(report.base.path)}</code>{_source_note(report.base)}</p>"
            f"{_base_check_note(report.tuned)}"
            f'<div class="verdict {escape(v.tone)}" id="verdict" data-label="{escape(v.label)}">'
            f'<p class="headline">{escape(v.wording)}</p><ul>{details}</ul></div>'
            f'<div class="cards">{card_html}</div></header>')


def _identity(report: ScanReport) -> str:
    rows = []
    for role, ck in (("base", report.base), ("tuned", report.tuned)):
        rows.append(f"<h3>{role}</h3>")
        kv = [("path", ck.path), ("kind", ck.kind), ("tensors", f"{ck.n_tensors:,}"),
              ("size on disk", _bytes(ck.bytes)), ("dtypes", ", ".join(ck.dtypes) or "n/a"),
              ("fingerprint", f"{ck.fingerprint} (sha256 of tensor names, dtypes, shapes and "
                              f"file sizes; first 16 hex digits)")]
        kv = kv[:-1] + _content_rows(ck) if getattr(ck, "sha256", None) else kv
        if ck.adapter:
            kv.append(("adapter", ", ".join(f"{k}={v}" for k, v in sorted(ck.adapter.items()))))
        rows.append('<table class="kv">' + "".join(
            f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in kv) + "</table>")
    return "".join(rows)


def _source_note(ck) -> str:
    """' (org/name@rev, commit abc..., sha256 0123...)' for the header line (escaped)."""
    parts = []
    if getattr(ck, "repo_id", None):
        rev = f"@{ck.revision}" if ck.revision and ck.revision != ck.commit else ""
        parts.append(f"{ck.repo_id}{rev}, commit {(ck.commit or '?')[:12]}")
    if getattr(ck, "sha256", None):
        parts.append(f"content sha256 {ck.sha256[:16]}")
    return f" ({escape('; '.join(parts))})" if parts else ""


def _base_check_note(ck) -> str:
    d = getattr(ck, "declared_base", None) or {}
    if d.get("status") not in ("mismatch", "unverified", "undeclared"):
        return ""
    kind = "warning" if d["status"] == "mismatch" else "note"
    return (f'<p class="warning" id="declared-base">{kind}: the adapter\'s declared base: '
            f"{escape(d.get('detail', ''))}</p>")


def _content_rows(ck) -> list:
    """Content identity, hub source and declared-base check (schema 1.2) as key/value rows."""
    kv = [("content sha256", f"{ck.sha256} (sha256 of the sorted per-file sha256s)")]
    kv += [(f"sha256 {f['name']}", f"{f['sha256']} ({_bytes(f.get('bytes', 0))})")
           for f in ck.files]
    if ck.repo_id:
        kv.append(("hub", f"{ck.repo_id}, revision {ck.revision or '(a snapshot path)'}, "
                          f"commit {ck.commit or '?'}"))
    if ck.declared_base:
        d = ck.declared_base
        kv.append(("declared base", f"{d.get('declared') or '(none)'}: {d.get('status')}"
                                    f"{' by ' + d['by'] if d.get('by') else ''}; "
                                    f"{d.get('detail', '')}"))
    return kv


def _config(report: ScanReport) -> str:
    c = report.config
    kv = [("top_k", f"{c.top_k} (tuned singular vectors tested per matrix)"),
          ("epsilon", ", ".join(f"{e:g}" for e in c.epsilons) + " (the first decides the listed "
                                                                 "intruders)"),
          ("vectors", f"{c.vectors} singular vectors"),
          ("include / exclude", f"{c.include or '(default: linear weights)'} / {c.exclude or '(none)'}"),
          ("near-degenerate window", f"{c.near_window:g} (relative sigma)"),
          ("device", f"{report.device} (requested {c.device})"),
          ("time taken", f"{report.seconds:.2f} s wall for the scan, "
                         f"{sum(l.seconds for l in report.layers):.2f} s in decompositions"),
          ("matrices", f"{len(report.layers)} paired, {len(report.skipped)} skipped, "
                       f"{len(report.unpaired_base)} base-only, {len(report.unpaired_tuned)} tuned-only")]
    return '<table class="kv">' + "".join(
        f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in kv) + "</table>"


def _sweep_table(report: ScanReport) -> str:
    rows = [(f"{e:g}", n, m) for e, n, m in views.sweep(report)]
    return table_html(["epsilon", "intruders", "matrices with >= 1"], rows, num=(1, 2))


def _storage_note(l) -> str:
    """' (tuned: gguf Q8_0)' for a matrix decoded from quantized storage (io/dequant.py)."""
    parts = [f"{side}: {kind}" for kind, side in ((l.storage_base, "base"),
                                                  (l.storage_tuned, "tuned"))
             if isinstance(kind, str) and kind.upper() not in ("F64", "F32", "F16", "BF16")]
    return f" ({'; '.join(parts)})" if parts else ""


def _layer_table(report: ScanReport) -> str:
    eps = sorted(set(report.config.epsilons))
    extra_eps = eps if len(eps) > 1 else []
    heads = [("#", "num"), ("matrix", "str"), ("block", "num"), ("module", "str"), ("shape", "str"),
             ("dtype", "str"), ("status", "str"), ("intruders", "num"), ("ranks", "str"),
             ("min max|cos|", "num"), ("energy %", "num"),
             ("\u2016\u0394W\u2016\u2082/\u03c3\u2096(W\u2080)", "num"),
             ("\u2016\u0394W\u2016F/\u2016W\u2080\u2016F", "num")]
    heads += [(f"count @ {e:g}", "num") for e in extra_eps] + [("seconds", "num")]
    th = "".join(f'<th data-type="{t}" class="{"num" if t == "num" else ""}" aria-sort="none">'
                 f"{escape(h)}</th>" for h, t in heads)
    body = []
    for i, l in enumerate(report.layers):
        p = views.split_name(l.name)
        mc = views.min_cos(l)

        def num(x, shown=None):
            ok = isinstance(x, (int, float)) and x == x and abs(x) != float("inf")
            return (f'<td class="num" data-v="{x if ok else ""}">'
                    f"{escape(shown if shown is not None else fmt_cell(x) if ok else 'n/a')}</td>")

        scanned = l.status == "scanned"
        cells = [num(i, str(i)), f'<td class="name">{escape(l.name)}</td>',
                 num(p.layer, "" if p.layer is None else str(p.layer)),
                 f"<td>{escape(p.module)}</td>", f'<td class="mono">{escape("x".join(map(str, l.shape)))}</td>',
                 f"<td>{escape(l.dtype + _storage_note(l))}</td>", f"<td>{escape(l.status)}</td>",
                 num(len(l.intruders), str(len(l.intruders))),
                 f"<td>{escape(','.join(str(x.index) for x in l.intruders))}</td>",
                 num(mc), num(100 * l.intruder_energy if scanned else None),
                 num(l.delta_norm_rel if scanned else None), num(l.delta_fro_rel if scanned else None)]
        counts = dict(l.counts_by_epsilon)
        cells += [num(counts.get(e, 0), str(counts.get(e, 0))) for e in extra_eps]
        cells.append(num(l.seconds, f"{l.seconds:.3f}"))
        flagged = "1" if l.intruders else "0"
        body.append(f'<tr data-name="{escape(l.name)}" data-status="{escape(l.status)}" '
                    f'data-flagged="{flagged}"{" class=" + chr(34) + "flagged" + chr(34) if l.intruders else ""}>'
                    + "".join(cells) + "</tr>")
    statuses = sorted({l.status for l in report.layers})
    opts = "".join(f'<option value="{escape(s)}">{escape(s)}</option>' for s in statuses)
    controls = (f'<div class="controls"><label>filter by name <input type="search" '
                f'id="layer-table-filter" placeholder="e.g. mlp up_proj layers.3."></label>'
                f'<label>status <select id="layer-table-status"><option value="">any</option>'
                f"{opts}</select></label><label><input type=\"checkbox\" id=\"layer-table-only\"> "
                f"only matrices with intruders</label><span>showing <b id=\"layer-table-shown\">"
                f"{len(report.layers)}</b> of {len(report.layers)}</span></div>")
    return (controls + '<div class="scroll"><table class="sortable" id="layer-table"><thead><tr>'
            + th + "</tr></thead><tbody>" + "".join(body) + "</tbody></table></div>"
            '<p class="note">Click a column header to sort (again to reverse). \u0394W = Wt - W0; '
            "\u2016\u0394W\u2016\u2082/\u03c3\u2096(W\u2080): spectral norm of the update over the "
            "base's k-th singular value (near or above 1: strong enough to enter the top-k); "
            "\u2016\u0394W\u2016F/\u2016W\u2080\u2016F: relative Frobenius change; energy: "
            "share of the top-k tuned sigma^2 carried by intruders.</p>")


def _intruder_table(report: ScanReport) -> str:
    rows = [(l.name, i.index, i.sigma, f"\u2264 {i.max_cos:.3f}" if i.max_cos_bound else i.max_cos,
             i.base_index, i.near_overlap, i.top_overlap, "yes" if i.in_cluster else "")
            for l in report.layers for i in l.intruders]
    if not rows:
        return f"<p>No intruders at epsilon {report.config.epsilon:g}.</p>"
    note = ""
    n_bound = sum(1 for l in report.layers for i in l.intruders if i.max_cos_bound)
    if n_bound:
        note = (f'<p class="note">{n_bound} max|cos| value(s) marked \u2264 are certified upper '
                f"bounds, not exact values: spectral slices of the base proved that no base "
                f"vector reaches them without the complete decomposition (the decisions are "
                f"exact; the best base index is then the best among the base's top vectors)."
                f"</p>")
    if len(rows) > MAX_INTRUDER_ROWS:
        note += (f'<p class="note">First {MAX_INTRUDER_ROWS} of {len(rows)} intruders; all are in '
                f"the JSON report and in intruder.load_report(...).</p>")
        rows = rows[:MAX_INTRUDER_ROWS]
    return note + '<div class="scroll">' + table_html(
        ["matrix", "rank j", "sigma_j", "max|cos|", "best base index", "near-cluster overlap",
         "top-2k subspace overlap", "in cluster"], rows, num=(1, 2, 3, 4, 5, 6)) + "</div>"


def _list_details(title: str, items: Sequence[str]) -> str:
    if not items:
        return ""
    shown = items[:200]
    more = f"<li>... and {len(items) - 200} more (see the JSON)</li>" if len(items) > 200 else ""
    return (f"<details><summary>{escape(title)} ({len(items)})</summary><ul>"
            + "".join(f"<li><code>{escape(x)}</code></li>" for x in shown) + more + "</ul></details>")


def _scale_section(table, fig) -> str:
    metrics = list(table.metrics)
    rows = [[p.label, "" if p.alpha is None else f"{p.alpha:g}",
             "" if p.intruders is None else p.intruders] + [p.get(m) for m in metrics] + [p.note]
            for p in table.points]
    out = [fig(_plots().tradeoff(table), "scale trade-off",
               f"Each point is one rescaled model ("
               f"{escape(table.intervention or 'W = Wt + (alpha - 1) sum_j sigma_j u_j v_j^T over the intruders')}"
               f"{'' if table.epsilon is None else f'; intruders at epsilon {table.epsilon:g}'}); "
               f"x: {escape(table.x_metric)}, y: {escape(table.y_metric)}. "
               f"Source: <code>{escape(table.source)}</code>.") if table.x_metric and table.y_metric
           else "",
           '<div class="wide">' + table_html(["model", "alpha", "intruders rescaled"] + metrics
                                              + ["note"], rows, cls="nowrap",
                                              num=tuple(range(2, len(metrics) + 3))) + "</div>"]
    if table.protocols:
        out.append("<ul class=\"note\">" + "".join(
            f"<li><b>{escape(n)}</b>: {escape(p)}</li>" for n, p in table.protocols) + "</ul>")
    return "".join(out)


def _plots():
    return plots


# ------------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------------


def _similarity(report: ScanReport, mode: bool | None, base_path, tuned_path, n_affected: int):
    """(blocks in display order, clean layer name, note in words)."""
    if mode is False:
        return [], None, "left out (similarity=False / --no-similarity)"
    affected = [l for l in views.most_affected(report, n_affected)]
    clean = views.clean_layer(report, [l.name for l in affected])
    chosen = affected + ([clean] if clean is not None else [])
    if not chosen:
        return [], None, "no changed matrices to draw"
    if mode is None:
        big = [l.name for l in chosen if min(l.shape) > AUTO_MAX_DIM]
        if big:
            return [], None, (f"not recomputed automatically: {big[0]} is larger than "
                              f"{AUTO_MAX_DIM} on its short side (ask with --similarity)")

    try:
        blocks = recompute_similarity(report, [l.name for l in chosen], base_path=base_path,
                                      tuned_path=tuned_path)
    except IntruderError as exc:
        if mode is True:
            raise
        return [], None, f"not available: {exc}"
    ordered = [blocks[l.name] for l in chosen if l.name in blocks]
    return ordered, (clean.name if clean is not None else None), (
        f"recomputed from the checkpoints for {len(ordered)} matrices (fingerprints verified)")


def _margin_section(report: ScanReport, extra: Sequence[Section], dpi: int) -> Section | None:
    """The margin view (intruder.report.margin_view) when the scan stored margin measures and
    the caller did not pass one already."""
    if any(s.anchor == "margin" for s in extra):
        return None
    if not any(l.margin is not None and l.margin.min_max_cos is not None
               for l in views.scanned(report)):
        return None
    return margin_section(report, dpi)


def _scale_table(scale_results):
    if scale_results is None or isinstance(scale_results, ScaleTable):
        return scale_results
    if isinstance(scale_results, (str, os.PathLike)):
        return load_scale_results(os.fspath(scale_results))
    return parse_scale_results(scale_results)


def _analysis_sections(report: ScanReport, fig: Figures, blocks, clean: str | None,
                       sim_note: str) -> list[tuple[str, str, str]]:
    """Grid, similarity, max|cos| and sweep, spectra: the figures of a scan with changed matrices."""
    plots = _plots()
    eps = report.config.epsilon
    k = report.config.top_k
    out = [("grid", "Where the intruders are: layer x module", "".join([
        fig(plots.layer_module_heatmap(report, "count"), "intruder count per layer and module",
            f"Number of intruders (top-{k} tuned vectors with max|cos| &lt; {eps:g}) per block "
            f"and module. Grey: no such matrix, or unchanged from the base."),
        fig(plots.layer_module_heatmap(report, "min_cos"), "lowest max|cos| per layer and module",
            f"How close each matrix came to an intruder: the lowest max|cos| of its top-{k} "
            f"vectors (red line on the scale: epsilon = {eps:g}). A fine-tune can move far from "
            f"the base (low values) well before any count appears at {eps:g}."),
        fig(plots.module_bars(report), "intruders per module", "Intruders per module type.")]))]
    if blocks:
        sim_html = fig(plots.similarity_heatmaps(blocks, clean), "similarity heatmaps",
                       f"|cos| between the top-{k} tuned singular vectors (rows) and the top "
                       f"{len(blocks[0].cos[0])} base singular vectors (columns), for the most "
                       f"affected matrices{' and one clean matrix for contrast' if clean else ''} "
                       f"(the paper's Figure 1 view). A row with no bright cell matches no base "
                       f"direction: an intruder (boxed). A vector whose best match lies beyond "
                       f"the columns shown still counts as matched if that max|cos| &ge; {eps:g}. "
                       f"{escape(sim_note)}.")
    else:
        sim_html = f'<p class="note">Similarity heatmaps {escape(sim_note)}.</p>'
    out.append(("similarity", "Similarity of tuned and base singular vectors", sim_html))
    out.append(("maxcos", "Distribution of max|cos| and the epsilon sweep", "".join([
        fig(plots.max_cos_histogram(report), "max|cos| histogram",
            f"Every top-{k} tuned vector of every changed matrix. Near 1: the vector is (up to "
            f"sign) a base vector. A random unit vector in high dimension scores far below 0.5 "
            f"against a full basis, so low values mean a genuinely new direction."),
        fig(plots.epsilon_sweep(report), "intruders against epsilon",
            "Counts for a fixed grid of epsilon computed from the stored max|cos| values "
            "(same rule as the scan: max|cos| &lt; epsilon)."),
        _sweep_table(report)])))
    sl = views.spectra_layers(report)
    if sl:
        which = ("the matrices with intruders" if any(l.intruders for l in sl)
                 else "the matrices closest to a first intruder")
        out.append(("spectra", "Singular value spectra, base and tuned", fig(
            plots.spectra(report, [l.name for l in sl]), "singular value spectra",
            f"Top singular values of W0 (base, top-{k}+5) and Wt (tuned, top-{k}) for {which}; "
            f"x marks an intruder, labelled with its max|cos|.")))
    return out


def render_html(report: ScanReport, extra: None | Sequence[Section] | Mapping[str, str] = None,
                *, scale_results=None, similarity: bool | None = None,
                base_path: str | None = None, tuned_path: str | None = None,
                command: str | None = None, n_affected: int = 3, dpi: int = 100) -> tuple[str, AuditInfo]:
    """Build the page; returns (html text, AuditInfo with path unset)."""
    fig = Figures(dpi)
    v = verdict_of(report)
    eps = report.config.epsilon
    k = report.config.top_k
    # inputs that can fail are read first, before seconds of drawing
    table = _scale_table(scale_results)
    has_layers = bool(views.scanned(report))
    blocks, clean, sim_note = [], None, "not applicable (no changed matrices)"
    if has_layers:
        blocks, clean, sim_note = _similarity(report, similarity, base_path, tuned_path, n_affected)
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)
    sections.append(("identity", "Base and tuned checkpoints", _identity(report)))
    sections.append(("config", "Configuration", _config(report)))
    if report.warnings:
        sections.append(("warnings", "Warnings", "".join(
            f'<div class="warning">{escape(w)}</div>' for w in report.warnings)))
    if has_layers:
        sections += _analysis_sections(report, fig, blocks, clean, sim_note)
    if table is not None:
        sections.append(("tradeoff", "Rescaling intruders: the trade-off", _scale_section(table, fig)))
    if has_layers:
        sections.append(("intruders", f"Intruders at epsilon {eps:g}", _intruder_table(report)))
    sections.append(("layers", "Every matrix", _layer_table(report)))
    if isinstance(extra, Mapping):
        extra = [Section(t, h) for t, h in extra.items()]
    extra = list(extra or ())
    margin = _margin_section(report, extra, dpi)
    if margin is not None:  # the margin view sits beside the count view
        at = next(i for i, s in enumerate(sections) if s[0] == "grid") + 1
        sections.insert(at, (margin.anchor, margin.title, margin.html))
        fig.n += margin.html.count("<figure>")
    for i, s in enumerate(extra):
        sections.append((s.anchor or f"extra-{i}", s.title, s.html))
    others = "".join([_list_details("skipped tensors", [f"{n}: {r}" for n, r in report.skipped]),
                      _list_details("base-only tensors (no tuned counterpart)", list(report.unpaired_base)),
                      _list_details("tuned-only tensors (no base counterpart)", list(report.unpaired_tuned))])
    if others:
        sections.append(("unpaired", "Skipped and unpaired tensors", others))
    generated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cmd = command or "(not recorded)"
    prov = [("tool", f"intruder {report.tool_version or '?'} (scan); report written by intruder "
                     f"{__version__}"),
            ("report schema", report.schema_version or "?"),
            ("scan command", report.command or "(not recorded)"),
            ("scan date (UTC)", report.created or "(not recorded)"),
            ("this page", f"{generated} by: {cmd}"),
            ("protocol", f"Algorithm 1 of Shuttleworth et al., 'LoRA vs Full Fine-tuning: An "
                         f"Illusion of Equivalence' (NeurIPS 2025): for each matrix, the top-{k} "
                         f"{report.config.vectors} singular vectors of Wt = W0 + dW are compared "
                         f"by |cos| with every singular vector of W0; vector j is an intruder iff "
                         f"its max|cos| < epsilon = {eps:g}. Decompositions in float64."),
            ("similarity heatmaps", sim_note)]
    sections.append(("provenance", "Provenance", '<table class="kv">' + "".join(
        f"<tr><th>{escape(a)}</th><td>{escape(b)}</td></tr>" for a, b in prov) + "</table>"))
    css, js = asset("audit.css"), asset("audit.js")
    csp = (f"default-src 'none'; img-src data:; style-src {csp_hash(css)}; "
           f"script-src {csp_hash(js)}; base-uri 'none'; form-action 'none'")
    toc = "".join(f'<a href="#{escape(a)}">{escape(t)}</a>' for a, t, _ in sections)
    body = "".join(f'<section id="{escape(a)}"><h2>{escape(t)}</h2>{h}</section>'
                   for a, t, h in sections)
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="generator" content="intruder">'
            f"<title>{escape('Intruder audit: ' + report.tuned.path)}</title>"
            f"<style>{css}</style></head><body>"
            + _header(report, v) + f'<nav class="toc">{toc}</nav>' + body
            + f"<footer>Self-contained report: no network access is needed or made. intruder "
              f"{escape(__version__)}.</footer><script>{js}</script></body></html>\n")
    return page, AuditInfo("", len(page.encode("utf-8")), fig.n, sim_note)


def write_html(report: ScanReport, path: str, extra=None, **options) -> AuditInfo:
    """Render the audit of `report` and write it atomically to `path`.

    extra: extra Sections (or {title: trusted html}) appended before the provenance.
    options: scale_results (path, parsed JSON or ScaleTable), similarity (None auto | True |
    False), base_path / tuned_path (where the checkpoints are now, for the heatmaps), command
    (recorded in the provenance), n_affected (layers in the heatmaps), dpi."""
    if not isinstance(report, ScanReport):
        raise ReportError(f"{path}: write_html needs a ScanReport (intruder.load_report(...)), "
                          f"got {type(report).__name__}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):  # fail before seconds of rendering
        raise OutputError(f"{path}: directory {os.path.dirname(path) or '.'} does not exist")
    page, info = render_html(report, extra, **options)
    write_text(path, page)
    return AuditInfo(path, info.bytes, info.figures, info.similarity)
