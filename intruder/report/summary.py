"""A scan report's summary block: counts, margin and provenance, derived from the layers.

The JSON writer (schema.py), the terminal table, the HTML audit, compare/track and the Python API
all read it from here; it is computed from a finished ScanReport and depends on nothing that
writes one.
"""

from __future__ import annotations

from ..provenance import provenance
from ..types import ScanReport


def total_intruders(layers) -> int:
    return sum(len(l.intruders) for l in layers)


def layers_with_intruders(layers):
    return [l for l in layers if l.intruders]


def summary(report: ScanReport) -> dict:
    """The report's summary block (also part of the JSON schema)."""
    scanned = [l for l in report.layers if l.status == "scanned"]
    counts = {}
    for e in sorted(set(report.config.epsilons)):
        counts[_eps_key(e)] = sum(dict(l.counts_by_epsilon).get(e, 0) for l in scanned)
    mins = [min(l.max_cos) for l in scanned if l.max_cos]
    energies = [l.intruder_energy for l in scanned]
    return {
        "layers_scanned": len(scanned),
        "layers_unchanged": sum(1 for l in report.layers if l.status == "unchanged"),
        "layers_nonfinite": sum(1 for l in report.layers if l.status == "nonfinite"),
        "layers_with_intruders": len(layers_with_intruders(scanned)),
        "total_intruders": total_intruders(scanned),
        "in_cluster_intruders": sum(1 for l in scanned for i in l.intruders if i.in_cluster),
        "counts_by_epsilon": counts,
        "min_max_cos": min(mins) if mins else None,
        "mean_intruder_energy": sum(energies) / len(energies) if energies else 0.0,
        "margin": _margin(report),
        "provenance": _provenance(report).to_dict(),
        "seconds": report.seconds,
    }


def _provenance(report):
    return provenance(report)


def _eps_key(e: float) -> str:
    return format(e, "g")


def _margin(report: ScanReport) -> dict:
    # the terminal table and error messages (report.table) use this module: no torch there
    from ..spectral.margin import margin_summary  # lazy: pulls torch

    return margin_summary(report.layers, report.config.epsilon)
