"""The one verdict of a scan, from the intruder counts, the margin and the update's shape together.

Intruder counts alone (Algorithm 1 at one epsilon) miss the common case: a LoRA update at a sane
learning rate is low rank and adds new directions, yet none of them may have crossed epsilon 0.5
(docs/margin.md). The update-shape vote (intruder.provenance: rank of Wt - W0 above the storage
rounding floor) sees it. The verdict's label is the update shape when that is known, else what
the counts suggest; its wording says where the measures disagree, e.g.

    LoRA-like update (rank 8), no intruders at epsilon 0.5 yet: margin 0.355 (lowest max|cos| ...)

`decide` computes it once; the scan stores it in its report and JSON, and the terminal table,
the HTML banner and the Python API show `verdict_of(report)` unchanged.
"""

from __future__ import annotations

from dataclasses import asdict

from ..provenance import provenance
from ..spectral.margin import margin_summary
from ..types import ScanReport, Verdict
from .views import concentration, module_totals, scanned, sweep

_UPDATE_WORDS = {"lora-like": "LoRA-like update", "full-ft-like": "Full-fine-tuning-like update",
                 "mixed": "Mixed update", "unresolved": "Update of unresolved shape"}


def verdict_of(report: ScanReport) -> Verdict:
    """The report's stored verdict, or a fresh one when it has none (or another epsilon)."""
    v = report.verdict
    if v is not None and v.epsilon == report.config.epsilon:
        return v
    return decide(report)


def _s(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _where(report: ScanReport, total: int, evidence: list[str]) -> str:
    """', concentrated in layers 20-31, mostly mlp.up_proj (24 of 25)' and the evidence for it."""
    place = ""
    where = concentration(report)
    if where is not None:
        word = "concentrated in" if where.concentrated else "spread over"
        place = f", {word} {where.label}"
        evidence.append(f"{where.inside} of {where.total} block-indexed intruders lie in "
                        f"{where.label}{' of ' + where.stack if where.stack else ''} "
                        f"(scanned blocks span {where.span} indices).")
    mods = sorted(((m, n) for m, n, _, _ in module_totals(report) if n), key=lambda x: -x[1])
    if mods:
        m0, n0 = mods[0]
        if n0 >= 0.5 * total:
            place += f", mostly {m0} ({n0} of {total})"
        else:
            place += ", across " + ", ".join(f"{m} ({n})" for m, n in mods[:3])
            place += " and others" if len(mods) > 3 else ""
    return place


def decide(report: ScanReport, roundings: int = 1) -> Verdict:
    """The verdict of one report. `roundings`: as in intruder.provenance.classify_layer (a
    track's step i against the base carries i roundings of the stored weights)."""
    eps = report.config.epsilon
    layers = scanned(report)
    n_all = len(report.layers)
    total = sum(len(l.intruders) for l in layers)
    with_i = sum(1 for l in layers if l.intruders)
    m = margin_summary(report.layers, eps)
    lows = [min(l.max_cos) for l in layers if l.max_cos]
    low = m["first_intruder_epsilon"] if m.get("layers") else (min(lows) if lows else None)
    low_layer = m.get("closest_layer") or (min((l for l in layers if l.max_cos),
                                                key=lambda l: min(l.max_cos)).name if lows else None)
    margin = None if low is None else low - eps
    novel = (m.get("novel_strength_quantiles") or {}).get("max")
    p = provenance(report, roundings)
    rank = p.estimated_rank

    def verdict(label: str, wording: str, conf: float | None, evidence: tuple[str, ...],
                agree: bool) -> Verdict:
        return Verdict(label, wording, conf, evidence, epsilon=eps, intruders=total,
                       matrices_with_intruders=with_i, matrices_changed=len(layers),
                       lowest_max_cos=low, margin=margin, novel_strength=novel,
                       update=p.verdict, estimated_rank=rank, agree=agree)

    unrelated = [w for w in report.warnings if "not look derived" in w]
    if not report.layers:
        return verdict("empty", "Nothing was scanned.", None, (), agree=True)
    if unrelated:
        return verdict("unrelated", "Not comparable: the tuned model does not look derived from "
                       "the base, so intruder counts mean nothing here.", None, tuple(unrelated),
                       agree=True)
    if not layers:
        return verdict("unchanged", f"Unchanged: all {n_all} matrices are bit-identical to the "
                       f"base (or were skipped); there is nothing to audit.", 1.0, (),
                       agree=True)
    evidence: list[str] = []
    counts = f"{_s(total, 'intruder')} at epsilon {eps:g} in {with_i} of {len(layers)} changed matrices"
    if total:
        counts += _where(report, total, evidence)
    low_txt = "" if low is None else f"lowest max|cos| {low:.3f}" + (f" in {low_layer}" if low_layer else "")
    no_intr = f"no intruders at epsilon {eps:g}"
    margin_txt = "" if margin is None else f": margin {margin:.3f} ({low_txt})"
    label = p.verdict
    conf: float | None = p.confidence
    shape = _UPDATE_WORDS.get(label, "")  # read only for the labels it names
    if rank is not None and label in ("lora-like", "mixed"):
        rr = p.rank_range
        shape += f" (rank {rank})" if not rr or rr[0] == rr[1] else f" (rank {rank}; range {rr[0]}-{rr[1]})"
    elif label == "full-ft-like":
        c = p.counts
        n_changed = c.get("low-rank", 0) + c.get("dense", 0)
        shape += f" (dense in {c.get('dense', 0)} of {n_changed} changed matrices)"
    agree = True
    if label in ("lora-like", "mixed"):
        if total:
            wording = f"{shape}: {counts}."
        else:
            wording = f"{shape}, {no_intr} yet{margin_txt}."
            agree = False
            evidence.append("The update is low rank and adds directions the base does not have, "
                            "but none has left the base's singular vectors far enough to count "
                            f"at epsilon {eps:g}; a longer run or a higher learning rate moves "
                            f"it there (docs/margin.md).")
    elif label == "full-ft-like":
        if total:
            wording = (f"{shape}, yet {counts}: the measures disagree (intruders usually come "
                       f"from low-rank updates).")
            agree = False
        else:
            wording = f"{shape}, {no_intr}{margin_txt}."
    elif label == "precision-only":
        wording = ("Only storage rounding changed: every changed matrix differs from the base at "
                   "the rounding level of its dtype (a dtype conversion, not a fine-tune)")
        wording += f"; {counts} mean nothing here." if total else "."
        agree = not total
    elif label == "unresolved":
        wording = (f"{shape} (changes at about the storage rounding level); "
                   + (f"{counts}." if total else f"{no_intr}{margin_txt}."))
    else:  # no update-shape measures (a report written before they existed): counts alone
        conf = None
        if total:
            label = "lora-like"
            wording = f"LoRA-like by intruder count: {counts}."
        else:
            label = "full-ft-like"
            wording = f"Full-fine-tuning-like by intruder count: {no_intr} in any of {len(layers)} changed matrices"
            wording += f"{margin_txt}." if margin is not None else "."
        evidence.append("This report has no update-shape measures (written by an older version); "
                        "the label rests on the intruder counts alone. Rescan for the rest.")
    if total:
        evidence.append("Shuttleworth et al. (NeurIPS 2025) find intruder dimensions after LoRA "
                        "fine-tuning and few or none after full fine-tuning; their presence is "
                        "evidence of a low-rank, high-learning-rate update, not proof.")
        in_cl = sum(1 for l in layers for i in l.intruders if i.in_cluster)
        if in_cl:
            evidence.append(f"{in_cl} flagged vector(s) lie inside a near-degenerate base cluster "
                            f"(a rotation among base directions, not a new one).")
    if p.verdict not in ("unknown",):
        evidence.append(f"Update shape: {p.verdict}" + (f" (confidence {p.confidence:.2f})"
                                                        if p.confidence else "") + ".")
        evidence.extend(e if e.endswith(".") else e + "." for e in p.evidence)
    if margin is not None:
        evidence.append(f"Margin: the first intruder would appear at epsilon {low:.3f} "
                        f"({low_layer}), {margin:+.3f} from epsilon {eps:g}.")
    if novel is not None:
        evidence.append(f"Novel strength ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0): largest "
                        f"{novel:.3f} ({m.get('strongest_layer')}); a new direction enters the "
                        f"top-{report.config.top_k} near 1.")
    sw = dict((e, n) for e, n, _ in sweep(report))
    if sw:
        evidence.append(f"Counts against epsilon (Algorithm 1, top-{report.config.top_k}): "
                        + ", ".join(f"{e:g}: {n}" for e, n in sw.items()) + ".")
    unchanged = sum(1 for l in report.layers if l.status == "unchanged")
    if unchanged:
        evidence.append(f"{unchanged} of {n_all} matrices are bit-identical to the base and were "
                        f"not decomposed.")
    return verdict(label, wording, None if conf is None else round(float(conf), 3),
                   tuple(evidence), agree=agree)


def to_dict(v: Verdict) -> dict:
    d = asdict(v)
    d["evidence"] = list(v.evidence)
    return d


def from_dict(d: dict) -> Verdict:
    """Rebuild a Verdict from its JSON form (validated by the schema)."""
    return Verdict(label=d["label"], wording=d["wording"], confidence=d.get("confidence"),
                   evidence=tuple(d.get("evidence", ())), epsilon=float(d["epsilon"]),
                   intruders=int(d["intruders"]),
                   matrices_with_intruders=int(d.get("matrices_with_intruders", 0)),
                   matrices_changed=int(d.get("matrices_changed", 0)),
                   lowest_max_cos=d.get("lowest_max_cos"), margin=d.get("margin"),
                   novel_strength=d.get("novel_strength"), update=d.get("update", "unknown"),
                   estimated_rank=d.get("estimated_rank"), agree=bool(d.get("agree", True)))


def verdict_text(v: Verdict) -> str:
    """The terminal form: the same sentence as the HTML banner and the API, with the label."""
    conf = f", confidence {v.confidence:.2f}" if v.confidence is not None else ""
    return f"verdict: {v.wording}  [{v.label}{conf}]"

