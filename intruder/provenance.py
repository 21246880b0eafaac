"""Provenance: was this fine-tune LoRA-like or full-fine-tuning-like? With its evidence. The
update-shape input of the one verdict (intruder/report/verdict.py).

Reads only a scan report (live or loaded from JSON): each scanned layer carries the singular values
of dW = Wt - W0, the rank above the storage rounding floor (`delta_rank`) and the sharpness of the
cliff there (`delta_rank_gap`), computed by intruder.spectral.margin.

Per matrix:
  unchanged       Wt == W0 bit for bit
  precision-only  dW is no larger than the rounding noise of the tuned storage dtype
  low-rank        rank r above the floor with r <= LOWRANK_FRAC x min(m, n), and what is left of
                  dW beyond those r directions looks like rounding noise (energy <= TAIL_NOISE x
                  the expected rounding energy; next singular value <= NEXT_NOISE x the noise
                  edge): a LoRA merge is exactly rank r plus rounding
  dense           rank above LOWRANK_FRAC x min(m, n), or energy beyond the rank > TAIL_DENSE x
                  the rounding energy (full fine-tuning updates every direction)
  unresolved      in between: structure just below the rounding floor (an update about as small
                  as the storage precision); does not vote
  saturated       dense only because the model's LoRA rank R fills it (R > LOWRANK_FRAC x min(m, n));
                  such a matrix cannot tell the two apart and does not vote
Per model: lora-like when at least AGREE of the changed matrices are low-rank, full-ft-like when
at least AGREE are dense, mixed otherwise. See docs/provenance.md.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, replace

LOWRANK_FRAC = 0.75
# energy of dW beyond its rank, in units of the expected rounding energy of the storage dtype:
# (up to 2: base and tuned may each have been rounded from higher-precision masters)
TAIL_NOISE = 2.2  # at most this: what is left is rounding noise
TAIL_DENSE = 3.0  # above this: a dense update continues below the floor
NEXT_NOISE = 1.6  # first value below the floor / noise edge (up to sqrt(2) for double rounding)
AGREE = 0.8
_LAYER_RX = re.compile(r"^(?:.*?\.)?(?:layers|h|layer|blocks|block)\.(\d+)\.(.+?)(?:\.weight)?$")


@dataclass(frozen=True)
class LayerVerdict:
    name: str
    module: str  # module type, e.g. self_attn.q_proj
    block: int | None  # transformer block index when the name has one
    kind: str  # unchanged | precision-only | low-rank | dense | saturated | unresolved | unknown
    rank: int | None  # singular values of dW above the rounding floor
    gap: float | None  # sv[rank-1] / sv[rank]
    min_dim: int


@dataclass(frozen=True)
class Provenance:
    verdict: str  # lora-like | full-ft-like | mixed | unresolved | unchanged | precision-only | unknown
    confidence: float  # 0..1: share of changed matrices agreeing, shrunk for few matrices
    estimated_rank: int | None  # most common rank among low-rank matrices
    rank_range: tuple[int, int] | None
    rank_by_module: dict[str, int]  # module type -> most common rank (low-rank matrices)
    kind_by_module: dict[str, str]  # module type -> majority class of its matrices
    adapted_modules: tuple[str, ...]  # module types with at least one changed matrix
    untouched_modules: tuple[str, ...]  # module types whose matrices are all unchanged
    counts: dict[str, int]  # class -> number of matrices
    declared: dict | None  # adapter_config.json facts when TUNED is an adapter
    evidence: tuple[str, ...]
    layers: tuple[LayerVerdict, ...]

    def to_dict(self, with_layers: bool = False) -> dict:
        d = asdict(self)
        d["rank_range"] = list(self.rank_range) if self.rank_range else None
        d["evidence"] = list(self.evidence)
        d["adapted_modules"] = list(self.adapted_modules)
        d["untouched_modules"] = list(self.untouched_modules)
        if with_layers:
            d["layers"] = [asdict(l) for l in self.layers]
        else:
            d.pop("layers")
        return d


def module_of(name: str) -> tuple[str, int | None]:
    """('self_attn.q_proj', 3) for 'model.layers.3.self_attn.q_proj.weight'."""
    # names come from a stranger's header: with a line break in one, the lazy groups above
    # backtrack in quadratic time (a 32 KB name took 13 s); a block index is at most 9 digits
    m = _LAYER_RX.match(name) if "\n" not in name else None
    if m and len(m.group(1)) <= 9:
        return m.group(2), int(m.group(1))
    return (name[: -len(".weight")] if name.endswith(".weight") else name), None


def classify_layer(layer, roundings: int = 1) -> LayerVerdict:
    """The class of one LayerResult from its dW spectrum measures. `roundings`: how many times
    the stored weights were rounded along the way (a track's step i vs the base: i), which
    scales the expected rounding energy (x roundings) and noise edge (x sqrt(roundings))."""
    module, block = module_of(layer.name)
    min_dim = min(layer.shape) if layer.shape else 0
    if layer.status == "unchanged":
        return LayerVerdict(layer.name, module, block, "unchanged", 0, None, min_dim)
    us = layer.update_shape
    if layer.status != "scanned" or us is None or us.rank is None:
        return LayerVerdict(layer.name, module, block, "unknown", None, None, min_dim)
    rank = int(us.rank)
    gap = float("inf") if us.rank_gap is None and us.rank_seen else us.rank_gap
    tail = us.tail_ratio
    nxt = us.next_edge
    if rank == 0:  # nothing above the floor: rounding alone, or a weak dense update
        kind = ("dense" if tail is not None and tail > TAIL_DENSE * roundings else
                "precision-only" if tail is None or tail <= TAIL_NOISE * roundings
                else "unresolved")
    elif not us.rank_seen or rank > LOWRANK_FRAC * min_dim \
            or (tail is not None and tail > TAIL_DENSE * roundings):
        kind = "dense"
    elif ((tail is None or tail <= TAIL_NOISE * roundings)
          and (nxt is None or nxt <= NEXT_NOISE * roundings ** 0.5)):
        kind = "low-rank"
    else:
        kind = "unresolved"
    return LayerVerdict(layer.name, module, block, kind, rank,
                        None if gap is None or gap == float("inf") else gap, min_dim)


def _mode(values: list[int]) -> int | None:
    if not values:
        return None
    c = Counter(values)
    best = max(c.values())
    return min(v for v, n in c.items() if n == best)  # ties: the smaller rank


def provenance(report, roundings: int = 1) -> Provenance:
    """Verdict for one scan report (TUNED against BASE); `roundings` as in classify_layer."""
    voted = [classify_layer(l, roundings) for l in report.layers if l.status != "nonfinite"]
    rank_lr = _mode([l.rank for l in voted if l.kind == "low-rank" and l.rank is not None])
    if rank_lr is not None:
        # a rank-R LoRA fills a matrix whose short side is below R / LOWRANK_FRAC: such a matrix
        # cannot tell LoRA from full fine-tuning, so it does not vote
        voted = [replace(l, kind="saturated") if l.kind == "dense" and l.rank is not None
                 and l.rank <= rank_lr and rank_lr > LOWRANK_FRAC * l.min_dim else l
                 for l in voted]
    layers = tuple(voted)
    counts = Counter(l.kind for l in layers)
    changed = [l for l in layers if l.kind in ("low-rank", "dense")]
    by_mod: dict[str, list[LayerVerdict]] = {}
    for l in layers:
        by_mod.setdefault(l.module, []).append(l)
    adapted = tuple(m for m, ls in by_mod.items()
                    if any(l.kind in ("low-rank", "dense", "saturated", "unresolved") for l in ls))
    untouched = tuple(m for m, ls in by_mod.items() if all(l.kind == "unchanged" for l in ls))
    kind_by_module = {}
    for m, ls in by_mod.items():
        c = Counter(l.kind for l in ls)
        kind_by_module[m] = max(sorted(c), key=lambda k: c[k])
    lr = [l for l in changed if l.kind == "low-rank"]
    ranks = [l.rank for l in lr if l.rank is not None]  # a low-rank verdict always has one
    rank_by_module = {}
    for m, ls in by_mod.items():
        r = _mode([l.rank for l in ls if l.kind == "low-rank" and l.rank is not None])
        if r is not None:
            rank_by_module[m] = r
    declared = _declared(report)
    n = len(changed)
    evidence = []
    if n == 0:
        if counts.get("precision-only"):
            verdict, conf = "precision-only", 1.0
            evidence.append(f"{counts['precision-only']} matrices differ only at the rounding level "
                            f"of their storage dtype (a dtype conversion, not a fine-tune)")
        elif counts.get("unresolved"):
            verdict, conf = "unresolved", 0.0
            evidence.append(f"{counts['unresolved']} changed matrices have updates about as small "
                            f"as the rounding noise of their storage dtype: neither a clean "
                            f"low-rank cliff nor a dense update can be seen")
        elif counts.get("unknown"):
            verdict, conf = "unknown", 0.0
            evidence.append("the report has no dW spectrum (written by an older version); rescan")
        else:
            verdict, conf = "unchanged", 1.0
            evidence.append("every scanned matrix is bit-identical to the base")
    else:
        share = len(lr) / n
        n_unres = counts.get("unresolved", 0)
        # voters' agreement, discounted by the matrices that could not vote, shrunk for few
        shrink = n / (n + 1) * n / (n + n_unres)
        lean = ""
        if share >= AGREE:
            verdict, conf = "lora-like", share * shrink
        elif share <= 1 - AGREE:
            verdict, conf = "full-ft-like", (1 - share) * shrink
        else:
            verdict = "mixed"
            # a mixture is credible when it follows module boundaries (e.g. LoRA on attention,
            # full fine-tuning of the MLP): share of changed module types that are pure
            mods = [m for m in adapted]
            pure = sum(1 for m in mods if len({l.kind for l in by_mod[m] if l in changed}) == 1)
            conf = (pure / len(mods) if mods else 0.0) * shrink
        if n_unres > n:  # most changed matrices sit at the rounding level: abstain
            lean = verdict
            verdict, conf = "unresolved", 0.0
        if lean:
            evidence.append(f"leaning {lean}, but {n_unres} changed matrices (more than the {n} "
                            f"that could vote) change at about the storage rounding level")
        evidence.append(f"{len(lr)} of {n} changed matrices have a low-rank update (Wt - W0 is "
                        f"rank r <= {LOWRANK_FRAC:g} x min(m, n) plus storage rounding noise), "
                        f"{n - len(lr)} a dense one")
        if ranks:
            evidence.append(f"estimated LoRA rank {_mode(ranks)} (most common; range "
                            f"{min(ranks)}-{max(ranks)}) from the singular values of Wt - W0 above "
                            f"the storage rounding floor")
        if counts.get("unresolved"):
            evidence.append(f"{counts['unresolved']} matrices change at about the storage rounding "
                            f"level and do not vote")
        if counts.get("saturated"):
            evidence.append(f"{counts['saturated']} matrices are too small to show a rank-"
                            f"{rank_lr} update as low rank; they do not vote")
        if untouched:
            evidence.append(f"module types left bit-identical: {', '.join(untouched)} "
                            f"(LoRA leaves untargeted modules untouched; full fine-tuning rarely does)")
        elif verdict == "full-ft-like":
            evidence.append("every scanned module type changed (as full fine-tuning does)")
    if declared:
        r = declared.get("r")
        evidence.append(f"TUNED is a PEFT adapter: adapter_config.json declares r={r}"
                        + (" (rsLoRA)" if declared.get("use_rslora") else "")
                        + (f", rank_pattern {declared['rank_pattern']}" if declared.get("rank_pattern") else ""))
        if ranks and isinstance(r, int) and max(ranks) > r and not declared.get("rank_pattern"):
            evidence.append(f"WARNING: measured rank {max(ranks)} exceeds the declared r={r}")
    return Provenance(
        verdict=verdict, confidence=round(float(conf), 3), estimated_rank=_mode(ranks),
        rank_range=(min(ranks), max(ranks)) if ranks else None, rank_by_module=rank_by_module,
        kind_by_module=kind_by_module, adapted_modules=adapted, untouched_modules=untouched,
        counts=dict(counts), declared=declared, evidence=tuple(evidence), layers=layers)


def _declared(report) -> dict | None:
    ad = getattr(report.tuned, "adapter", None)
    if not ad:
        return None
    return {k: ad.get(k) for k in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora",
                                   "target_modules", "rank_pattern", "modules_to_save")}


def verdict_line(p: Provenance) -> str:
    """One line for a terminal table."""
    return verdict_line_dict(p.to_dict())


def verdict_line_dict(p: dict) -> str:
    """verdict_line from the summary's provenance dict (live or loaded from JSON)."""
    rank = f", estimated rank {p['estimated_rank']}" if p.get("estimated_rank") is not None else ""
    rr = p.get("rank_range")
    if rr and rr[0] != rr[1]:
        rank += f" (range {rr[0]}-{rr[1]})"
    mods = ",".join(_short(m) for m in p.get("adapted_modules") or ()) or "none"
    c = p.get("counts") or {}
    return (f"{p['verdict']} (confidence {p['confidence']:.2f}{rank}; adapted: {mods}; "
            f"matrices low-rank {c.get('low-rank', 0)}, dense {c.get('dense', 0)}, "
            f"unchanged {c.get('unchanged', 0)})")


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]
