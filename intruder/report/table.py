"""Plain-text tables for the terminal (no heavy imports: `intruder scan` must start fast)."""

from __future__ import annotations

from typing import List, Sequence

from ..types import ScanReport


def format_table(headers: Sequence[str], rows: List[Sequence[object]], align: str = "") -> str:
    """Columns padded to width; `align` holds 'l' or 'r' per column (default: left)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" * len(headers)

    def line(r):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                         for c, w, a in zip(r, widths, align)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _fmt(c) -> str:
    if isinstance(c, float):
        return f"{c:.3f}"
    return printable(str(c))


def printable(text: str) -> str:
    """Control, format (bidi override, zero-width) and line-separator characters escaped: names
    from a stranger's checkpoint must neither drive the terminal nor break or disguise a line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def scan_table(report: ScanReport, max_rows: int = 40) -> str:
    """Layers with intruders, then totals, counts per epsilon and the time taken."""
    from ..scan import summary

    s = summary(report)
    c = report.config
    eps = c.epsilon
    flagged = sorted((l for l in report.layers if l.intruders),
                     key=lambda l: (-len(l.intruders), l.name))
    from .verdict import verdict_of, verdict_text

    lines = [f"intruder scan  (Algorithm 1: top-{c.top_k} {c.vectors} singular vectors, "
             f"intruder iff max |cos| to every base vector < epsilon = {eps:g})",
             f"  base : {report.base.path}  [{report.base.kind}]",
             f"  tuned: {report.tuned.path}  [{report.tuned.kind}]", ""]
    if flagged:
        rows = []
        for l in flagged[:max_rows]:
            rows.append([l.name, "x".join(map(str, l.shape)), len(l.intruders),
                         ",".join(str(i.index) for i in l.intruders),
                         min(l.max_cos), f"{100 * l.intruder_energy:.1f}%",
                         sum(1 for i in l.intruders if i.in_cluster)])
        lines.append(format_table(
            ["layer", "shape", "intruders", "ranks", "min max|cos|", "energy (top-k sigma^2)",
             "in cluster"], rows, "llrrrrr"))
        if len(flagged) > max_rows:
            lines.append(f"... and {len(flagged) - max_rows} more layers with intruders (see JSON)")
    else:
        lines.append(f"No intruders at epsilon {eps:g} in any of {s['layers_scanned']} matrices.")
    lines.append("")
    mm = s["min_max_cos"]
    lines.append(f"matrices scanned: {s['layers_scanned']}  unchanged: {s['layers_unchanged']}  "
                 f"with intruders: {s['layers_with_intruders']}  total intruders: "
                 f"{s['total_intruders']}  lowest max|cos|: "
                 f"{'n/a' if mm is None else format(mm, '.3f')}")
    counts = "  ".join(f"eps {k}: {v}" for k, v in s["counts_by_epsilon"].items())
    lines.append(f"intruder counts by epsilon (all matrices): {counts}")
    if s.get("margin", {}).get("layers"):
        from ..spectral.margin import margin_line

        lines.append(margin_line(s["margin"]))
    if s.get("provenance"):
        from ..provenance import verdict_line_dict

        lines.append("provenance: " + verdict_line_dict(s["provenance"]))
    if s["in_cluster_intruders"]:
        lines.append(f"note: {s['in_cluster_intruders']} flagged vector(s) lie inside a "
                     f"near-degenerate base cluster (rotation, not a new direction)")
    if report.unpaired_base or report.unpaired_tuned:
        lines.append(f"unpaired: {len(report.unpaired_base)} base-only, "
                     f"{len(report.unpaired_tuned)} tuned-only tensors (listed in the JSON)")
    for w in report.warnings:
        lines.append(f"WARNING: {w}")
    lines.append(f"time: {report.seconds:.2f} s wall on {report.device}")
    lines.append(printable(verdict_text(verdict_of(report))))
    return "\n".join(lines)
