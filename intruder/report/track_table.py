"""Terminal tables of `intruder track` and `intruder compare` (no heavy imports)."""

from __future__ import annotations

from ..track import PERSIST_COS, summaries
from .table import BOUND_NOTE, bound_count, format_table, printable, source_text


def _f(x, fmt=".3f"):
    return "n/a" if x is None else format(x, fmt)


def _counts(c: dict) -> str:
    return " ".join(f"{v}" for _, v in sorted(c.items(), key=lambda kv: float(kv[0])))


def track_table(tr) -> str:
    """One row per checkpoint: intruders vs base (per epsilon), margin, provenance; in a track
    also the intruders against the previous step and how many persist."""
    c = tr.config
    eps = c.epsilon
    eps_list = "/".join(format(e, "g") for e in sorted(set(c.epsilons)))
    rows = summaries(tr)
    head = (f"intruder {tr.mode}  (Algorithm 1: top-{c.top_k} {c.vectors} singular vectors, "
            f"intruder iff max |cos| to every base vector < epsilon; counts at epsilon {eps_list}, "
            f"all matrices)")
    lines = [head, f"  base: {tr.base.path}  [{tr.base.kind}]{source_text(tr.base)}", ""]
    if tr.mode == "track":
        headers = ["step", "checkpoint", f"vs base @{eps_list}", "energy", "lowest max|cos|",
                   "novel strength", f"vs previous @{eps_list}", "persist", "new", "gone",
                   "update vs base", "this step"]
        body = []
        for i, (e, r) in enumerate(zip(tr.entries, rows), 1):
            vp = r["vs_previous"]
            body.append([i, e.label, _counts(r["counts_by_epsilon"]),
                         f"{100 * r['mean_intruder_energy']:.1f}%", _f(r["min_max_cos"]),
                         _f(r["novel_strength_max"]),
                         _counts(vp["counts_by_epsilon"]) if vp else "(= vs base)",
                         r["persistent"], r["new"], r["gone"], _verdict(r["provenance"]),
                         _verdict(vp["provenance"]) if vp else "(= vs base)"])
        lines.append(format_table(headers, body, "rlrrrrrrrrll"))
        lines.append("")
        lines.append(f"persist: intruders (vs base, epsilon {eps:g}) matching an intruder of the "
                     f"step before with |cos| >= {PERSIST_COS:g}; new: matching none; gone: "
                     f"intruders of the step before matched by none. energy: mean share of the "
                     f"top-{c.top_k} sigma^2 carried by intruders. novel strength: max over "
                     f"matrices of ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0) (a new direction "
                     f"enters the top-k near 1). update vs base: provenance of the cumulative "
                     f"update (noise model: one rounding of stored weights per step); this step: "
                     f"of the update against the step before.")
    else:
        headers = ["fine-tune", "input", f"intruders @{eps_list}", "matrices w/ intr.",
                   "lowest max|cos|", "novel strength", "verdict", "conf.", "est. rank",
                   "adapted modules"]
        body = []
        for e, r in zip(tr.entries, rows):
            p = r["provenance"]
            rr = p.get("rank_range")
            rank = ("-" if p.get("estimated_rank") is None else
                    str(p["estimated_rank"]) + (f" ({rr[0]}-{rr[1]})" if rr and rr[0] != rr[1] else ""))
            body.append([e.label, r["kind"], _counts(r["counts_by_epsilon"]),
                         f"{r['layers_with_intruders']}/{r['layers_scanned']}",
                         _f(r["min_max_cos"]), _f(r["novel_strength_max"]), p["verdict"],
                         f"{p['confidence']:.2f}", rank,
                         ",".join(m.rsplit(".", 1)[-1] for m in p.get("adapted_modules") or ()) or "none"])
        lines.append(format_table(headers, body, "llrrrrlrrl"))
        lines.append("")
        lines.append("verdict: lora-like when >= 80% of changed matrices have a low-rank update "
                     "(a cliff in the singular values of Wt - W0 above the storage rounding "
                     "floor), full-ft-like when >= 80% have a dense one; est. rank: the most "
                     "common rank (range). See docs/provenance.md.")
    n_bound = bound_count([x for e in tr.entries for x in (e.vs_base, e.vs_previous)])
    if n_bound:
        lines.append(f"note: {n_bound} {BOUND_NOTE} (the lowest max|cos| may be one)")
    for e in tr.entries:
        ident = source_text(e.vs_base.tuned).strip()
        if ident:
            lines.append(f"{e.label}: {ident}")
    for e, r in zip(tr.entries, rows):
        lines.append(printable(f"verdict ({e.label}): {r['verdict']['wording']}"))
    for e, r in zip(tr.entries, rows):
        for w in r["warnings"]:
            lines.append(f"WARNING ({e.label}): {w}")
    lines.append(f"time: {tr.seconds:.2f} s wall on {tr.device}")
    return "\n".join(lines)


def _verdict(p: dict) -> str:
    v = p["verdict"]
    if p.get("estimated_rank") is not None and v in ("lora-like", "mixed"):
        v += f" r~{p['estimated_rank']}"
    return v
