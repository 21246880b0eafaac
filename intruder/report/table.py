"""Plain-text tables for the terminal (no heavy imports: `intruder scan` must start fast)."""

from __future__ import annotations

from collections.abc import Sequence

from ..provenance import verdict_line_dict
from ..types import ScanReport
from .summary import summary


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
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


def bound_count(reports) -> int:
    """max|cos| values reported as certified upper bounds (spectral slices) in these reports."""
    return sum(1 for r in reports if r is not None for l in r.layers for b in l.max_cos_bound
               if b)


BOUND_NOTE = ("max|cos| value(s) are certified upper bounds, not exact values (spectral "
              "slices proved every decision without the complete base; decisions are exact; "
              "per vector: max_cos_bound in the JSON)")


def min_cos_text(layer) -> str:
    """The layer's lowest max|cos|, written '<=x' when that value is a certified upper bound."""
    if not layer.max_cos:
        return "n/a"
    j = min(range(len(layer.max_cos)), key=lambda i: layer.max_cos[i])
    bound = bool(layer.max_cos_bound) and layer.max_cos_bound[j]
    return ("<=" if bound else "") + f"{layer.max_cos[j]:.3f}"


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


def source_text(info) -> str:
    """Content hash, hub source and declared-base check of a checkpoint, for a header line."""
    parts = []
    if getattr(info, "sha256", None):
        parts.append(f"sha256 {info.sha256[:16]} (content, {len(info.files)} file(s))")
    if getattr(info, "repo_id", None):
        rev = f"@{info.revision}" if info.revision and info.revision != info.commit else ""
        parts.append(f"hub {info.repo_id}{rev} commit {(info.commit or '?')[:12]}")
    check = getattr(info, "declared_base", None)
    if check:
        parts.append(f"declared base: {check.get('status')}"
                     + (f" by {check['by']}" if check.get("by") else ""))
    return ("\n         " + "; ".join(parts)) if parts else ""


def storage_lines(report: ScanReport) -> list[str]:
    """Which matrices were decoded from quantized storage, and which were skipped for their
    dtype (io/dequant.py, io/gguf.py)."""
    counts: dict[tuple[str, str], int] = {}
    for l in report.layers:
        for kind, side in ((l.storage_base, "base"), (l.storage_tuned, "tuned")):
            plain = ("F64", "F32", "F16", "BF16")  # not stored plainly otherwise
            if isinstance(kind, str) and kind and kind.upper() not in plain:
                counts[side, kind] = counts.get((side, kind), 0) + 1
    out = []
    if counts:
        out.append("decoded to float before the scan: " + "; ".join(
            f"{side} {kind} ({n} matrices)" for (side, kind), n in sorted(counts.items())))
    codes = [n for n, why in report.skipped if why.endswith("not scanned")]
    if codes:
        out.append(f"note: {len(codes)} matrices skipped for their stored dtype (e.g. {codes[0]}; "
                   f"reasons in the JSON's skipped list)")
    return out


def scan_table(report: ScanReport, max_rows: int = 40) -> str:
    """Layers with intruders, then totals, counts per epsilon and the time taken."""
    s = summary(report)
    c = report.config
    eps = c.epsilon
    flagged = sorted((l for l in report.layers if l.intruders),
                     key=lambda l: (-len(l.intruders), l.name))
    from .verdict import verdict_of, verdict_text  # lazy: pulls torch (CLI start imports this)

    lines = [f"intruder scan  (Algorithm 1: top-{c.top_k} {c.vectors} singular vectors, "
             f"intruder iff max |cos| to every base vector < epsilon = {eps:g})",
             f"  base : {report.base.path}  [{report.base.kind}]{source_text(report.base)}",
             f"  tuned: {report.tuned.path}  [{report.tuned.kind}]{source_text(report.tuned)}",
             ""]
    if flagged:
        rows = []
        for l in flagged[:max_rows]:
            rows.append([l.name, "x".join(map(str, l.shape)), len(l.intruders),
                         ",".join(str(i.index) for i in l.intruders),
                         min_cos_text(l), f"{100 * l.intruder_energy:.1f}%",
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
    n_bound = bound_count([report])
    if n_bound:
        lines.append(f"note: {n_bound} {BOUND_NOTE.replace('value(s)', 'value(s), marked <=,')}")
    counts = "  ".join(f"eps {k}: {v}" for k, v in s["counts_by_epsilon"].items())
    lines.append(f"intruder counts by epsilon (all matrices): {counts}")
    if s.get("margin", {}).get("layers"):
        from ..spectral.margin import margin_line  # lazy: pulls torch

        lines.append(margin_line(s["margin"]))
    if s.get("provenance"):
        lines.append("provenance: " + verdict_line_dict(s["provenance"]))
    if s["in_cluster_intruders"]:
        lines.append(f"note: {s['in_cluster_intruders']} flagged vector(s) lie inside a "
                     f"near-degenerate base cluster (rotation, not a new direction)")
    lines += storage_lines(report)
    if report.unpaired_base or report.unpaired_tuned:
        lines.append(f"unpaired: {len(report.unpaired_base)} base-only, "
                     f"{len(report.unpaired_tuned)} tuned-only tensors (listed in the JSON)")
    for w in report.warnings:
        lines.append(f"WARNING: {w}")
    lines.append(f"time: {report.seconds:.2f} s wall on {report.device}")
    lines.append(printable(verdict_text(verdict_of(report))))
    return "\n".join(lines)
