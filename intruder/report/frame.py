"""pandas views of a scan report: one row per matrix, per intruder, or per top-k vector.

    import intruder
    rep = intruder.load_report("intruder-scan.json")
    df = rep.to_dataframe()                       # one row per matrix
    df[df.intruders > 0].groupby("module").intruders.sum()
"""

from __future__ import annotations

from ..provenance import provenance
from ..types import ScanReport
from .schema import MEASURE_KEYS, layer_measures
from .views import split_name


def _nan(x):
    return float("nan") if x is None else x


_TEXT = ("delta_grid", "delta_sv_method", "storage_base", "storage_tuned")  # None when absent
_SEQ = ("max_cos", "base_index", "sigma_tuned", "sigma_base", "near_overlap", "top_overlap",
        "max_cos_right", "base_index_right")


def to_dataframe(report: ScanReport):
    """One row per matrix, in checkpoint order, with every per-matrix field of the JSON report.

    Columns: name, stack, layer (block index; <NA> outside numbered blocks), module, shape, rows,
    cols, dtype, status, intruders (count at the first epsilon), intruder_ranks, min_max_cos,
    mean_max_cos, intruder_energy (share of top-k sigma^2), delta_norm_rel (||dW||_2 /
    sigma_k(W0)), delta_fro_rel (||dW||_F / ||W0||_F), in_cluster, seconds, method,
    `count@EPS` for every epsilon of the scan configuration and counts_by_epsilon (a dict);
    the top-k vectors as tuples (max_cos, base_index, sigma_tuned, sigma_base, near_overlap,
    top_overlap, and the right-vector ones with --vectors right|both); the margin and update-shape
    measures under their JSON names (LayerResult.margin: cos_margin, novel_strength, subspace_cos,
    weight_cos; LayerResult.update_shape: delta_stable_rank, delta_rank, delta_rank_gap,
    delta_tail_ratio, delta_next_edge, delta_floor, delta_grid, delta_sv ...; docs/margin.md;
    NaN / None where a matrix has none), storage_base / storage_tuned; and `update`, the
    matrix's update shape from provenance (low-rank | dense | unresolved | precision-only |
    saturated | unchanged | unknown)."""
    import pandas as pd

    eps = sorted(set(report.config.epsilons))
    shape_of = {lv.name: lv.kind for lv in provenance(report).layers}
    rows = []
    for l in report.layers:
        p = split_name(l.name)
        counts = dict(l.counts_by_epsilon)
        row = {
            "name": l.name, "stack": p.stack, "layer": p.layer, "module": p.module,
            "shape": tuple(l.shape),
            "rows": l.shape[0] if len(l.shape) > 0 else None,
            "cols": l.shape[1] if len(l.shape) > 1 else None,
            "dtype": l.dtype, "status": l.status,
            "intruders": len(l.intruders),
            "intruder_ranks": tuple(i.index for i in l.intruders),
            "min_max_cos": min(l.max_cos) if l.max_cos else float("nan"),
            "mean_max_cos": sum(l.max_cos) / len(l.max_cos) if l.max_cos else float("nan"),
            "intruder_energy": l.intruder_energy,
            "delta_norm_rel": _nan(l.delta_norm_rel), "delta_fro_rel": _nan(l.delta_fro_rel),
            "in_cluster": sum(1 for i in l.intruders if i.in_cluster),
            "seconds": l.seconds, "method": l.method,
            "update": shape_of.get(l.name, "unknown"),
            "counts_by_epsilon": {format(e, "g"): n for e, n in l.counts_by_epsilon},
        }
        for e in eps:
            row[f"count@{e:g}"] = counts.get(e, 0) if l.status == "scanned" else 0
        for k in _SEQ:
            row[k] = tuple(getattr(l, k))
        got = layer_measures(l)  # the JSON's measures; NaN / None where the layer has none
        for k in MEASURE_KEYS:
            v = got.get(k)
            row[k] = tuple(v) if isinstance(v, list) else (v if k in _TEXT or isinstance(v, bool)
                                                           else _nan(v))
        rows.append(row)
    df = pd.DataFrame(rows, columns=None if rows else ["name"])
    if rows:
        df["layer"] = df["layer"].astype("Int64")
        if "delta_rank" in df:
            df["delta_rank"] = df["delta_rank"].astype("Int64")
    return df


def intruders_dataframe(report: ScanReport):
    """One row per intruder: layer name, block, module, rank, sigma, max_cos, matched base
    index, near/top-subspace overlaps and whether it lies in a near-degenerate base cluster."""
    import pandas as pd

    rows = []
    for l in report.layers:
        p = split_name(l.name)
        for i in l.intruders:
            rows.append({"name": l.name, "layer": p.layer, "module": p.module, "rank": i.index,
                         "sigma": i.sigma, "max_cos": i.max_cos, "base_index": i.base_index,
                         "near_overlap": i.near_overlap, "top_overlap": i.top_overlap,
                         "in_cluster": i.in_cluster})
    cols = ["name", "layer", "module", "rank", "sigma", "max_cos", "base_index", "near_overlap",
            "top_overlap", "in_cluster"]
    df = pd.DataFrame(rows, columns=cols)
    df["layer"] = df["layer"].astype("Int64")
    return df


def vectors_dataframe(report: ScanReport):
    """One row per top-k tuned vector of every scanned matrix (the raw material of the sweep):
    name, layer, module, rank, sigma_tuned, max_cos, base_index, intruder (at the first epsilon)."""
    import pandas as pd

    rows = []
    for l in report.layers:
        if l.status != "scanned":
            continue
        p = split_name(l.name)
        flagged = {i.index for i in l.intruders}
        for j, c in enumerate(l.max_cos):
            rows.append({"name": l.name, "layer": p.layer, "module": p.module, "rank": j,
                         "sigma_tuned": l.sigma_tuned[j] if j < len(l.sigma_tuned) else float("nan"),
                         "max_cos": c,
                         "base_index": l.base_index[j] if j < len(l.base_index) else -1,
                         "intruder": j in flagged})
    cols = ["name", "layer", "module", "rank", "sigma_tuned", "max_cos", "base_index", "intruder"]
    df = pd.DataFrame(rows, columns=cols)
    df["layer"] = df["layer"].astype("Int64")
    return df
