"""The scan report's versioned JSON schema: serialise, validate, load.

Contract other tools rely on (extend freely, never rename): top-level `schema_version`, `base`,
`tuned`, `config` {top_k, epsilon (list)}, `layers` [{name, shape, max_cos, intruders [{index,
sigma, max_cos, base_index}]}], `summary` {layers_scanned, total_intruders, counts_by_epsilon}.
`intruders` are those at the first epsilon of config.epsilon.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from typing import Any, Dict

from ..errors import ReportError
from ..types import CheckpointInfo, Intruder, LayerResult, ScanConfig, ScanReport
from .validate import validate_report

SCHEMA_VERSION = "1.2"  # 1.1: margin + dW-spectrum layer fields, summary margin/provenance;
# 1.2: per-file sha256, content hash, hub repo_id / revision / commit, declared base
SCHEMA_ID = "https://github.com/intruder-tool/intruder/schema/scan-report-1.json"

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_CKPT = {"type": "object", "required": ["path", "kind", "n_tensors", "fingerprint"],
         "properties": {"path": _STR, "kind": _STR, "n_tensors": _INT, "bytes": _INT,
                        "fingerprint": _STR, "dtypes": {"type": "array", "items": _STR}}}
# 1.2: content identity and hub source of each checkpoint (intruder/io/identity.py, io/hub.py,
# io/basecheck.py); fingerprint is now the first 16 hex digits of sha256
_NULL_STR = {"type": ["string", "null"]}
_CKPT["properties"].update({
    "sha256": _NULL_STR,  # sha256 of the sorted per-file sha256 hex digests, one per line
    "files": {"type": "array", "items": {
        "type": "object", "required": ["name", "sha256"],
        "properties": {"name": _STR, "bytes": _INT, "sha256": _STR}}},
    "repo_id": _NULL_STR, "revision": _NULL_STR, "commit": _NULL_STR,
    "declared_base": {"type": ["object", "null"], "properties": {
        "declared": _NULL_STR, "resolved": _NULL_STR, "given": _STR,
        "status": {"type": "string", "enum": ["match", "mismatch", "unverified", "undeclared"]},
        "by": _STR, "detail": _STR}},
})
_INTRUDER = {"type": "object", "required": ["index", "sigma", "max_cos", "base_index"],
             "properties": {"index": _INT, "sigma": _NUM, "max_cos": _NUM, "base_index": _INT,
                            "near_overlap": _NUM, "top_overlap": _NUM,
                            "in_cluster": {"type": "boolean"},
                            "max_cos_bound": {"type": "boolean"}}}
_LAYER = {"type": "object", "required": ["name", "shape", "max_cos", "intruders"],
          "properties": {"name": _STR, "shape": {"type": "array", "items": _INT},
                         "status": {"type": "string",
                                    "enum": ["scanned", "unchanged", "nonfinite"]},
                         "max_cos": {"type": "array", "items": _NUM},
                         "base_index": {"type": "array", "items": _INT},
                         "sigma_tuned": {"type": "array", "items": _NUM},
                         "sigma_base": {"type": "array", "items": _NUM},
                         "intruders": {"type": "array", "items": _INTRUDER},
                         "counts_by_epsilon": {"type": "object"},
                         "intruder_energy": _NUM,
                         # 1.1, intruder/spectral/margin.py and docs/margin.md
                         "min_max_cos": _NUM,  # lowest max|cos| = epsilon of the first intruder
                         "cos_margin": _NUM,  # min_max_cos - epsilon (< 0: has intruders)
                         "novel_strength": _NUM,  # ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0)
                         "subspace_cos": _NUM,  # cos of the largest principal angle, top-k
                         "delta_stable_rank": _NUM,  # ||dW||_F^2 / ||dW||_2^2
                         "weight_cos": _NUM,  # <W0, Wt> / (||W0||_F ||Wt||_F)
                         "delta_rank": _INT,  # singular values of dW above delta_floor
                         "delta_rank_seen": {"type": "boolean"},  # a value below the floor seen
                         "delta_rank_gap": _NUM,  # sv[rank-1] / sv[rank]
                         "delta_tail_ratio": _NUM,  # energy beyond the rank / rounding energy
                         "delta_next_edge": _NUM,  # sv[rank] / rounding-noise edge
                         "delta_floor": _NUM,  # rounding-noise edge of the tuned storage dtype
                         "delta_grid": _STR,  # storage grid of Wt: bfloat16|float16|float32|float64
                         "delta_sv_method": {"type": "string", "enum": ["gram", "randomized"]},
                         "delta_sv": {"type": "array", "items": _NUM},  # top 64 of dW
                         # engine: per max_cos entry, true where the value is a certified upper
                         # bound (spectral slices; decisions exact); absent when all are exact
                         "max_cos_bound": {"type": "array", "items": {"type": "boolean"}},
                         # quantized / scaled storage decoded before the analysis (io/dequant.py,
                         # io/gguf.py), e.g. "fp8_e4m3 per-channel scale", "gguf Q8_0"; only on
                         # layers where a side was stored that way
                         "storage_base": _STR, "storage_tuned": _STR}}
SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "intruder scan report",
    "type": "object",
    "required": ["schema_version", "base", "tuned", "config", "layers", "summary"],
    "properties": {
        "schema_version": _STR,
        "tool_version": _STR,
        "base": _CKPT,
        "tuned": _CKPT,
        "config": {"type": "object", "required": ["top_k", "epsilon"],
                   "properties": {"top_k": {"type": "integer", "minimum": 1},
                                  "epsilon": {"type": "array", "items": _NUM, "minItems": 1},
                                  "vectors": {"type": "string",
                                              "enum": ["left", "right", "both"]}}},
        "layers": {"type": "array", "items": _LAYER},
        "summary": {"type": "object",
                    "required": ["layers_scanned", "total_intruders", "counts_by_epsilon"],
                    "properties": {"layers_scanned": _INT, "total_intruders": _INT,
                                   "counts_by_epsilon": {"type": "object"},
                                   # 1.1: distribution of the margin over layers, provenance
                                   "margin": {"type": "object", "properties": {
                                       "layers": _INT, "first_intruder_epsilon": _NUM,
                                       "cos_margin": _NUM, "closest_layer": _STR,
                                       "strongest_layer": _STR}},
                                   "provenance": {"type": "object",
                                                  "required": ["verdict", "confidence"],
                                                  "properties": {
                                                      "verdict": {"type": "string", "enum": [
                                                          "lora-like", "full-ft-like", "mixed",
                                                          "unresolved", "unchanged",
                                                          "precision-only", "unknown"]},
                                                      "confidence": _NUM,
                                                      "estimated_rank": _INT}}}},
    },
}


def _finite(x: float):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def to_dict(report: ScanReport) -> Dict[str, Any]:
    """The report as plain JSON-ready data."""
    from ..scan import summary

    c = report.config
    layers = []
    for l in report.layers:
        d = {"name": l.name, "shape": list(l.shape), "dtype": l.dtype, "status": l.status,
             "max_cos": list(l.max_cos), "base_index": list(l.base_index),
             "sigma_tuned": list(l.sigma_tuned), "sigma_base": list(l.sigma_base),
             "intruders": [asdict(i) for i in l.intruders],
             "counts_by_epsilon": {format(e, "g"): n for e, n in l.counts_by_epsilon},
             "intruder_energy": l.intruder_energy,
             "near_overlap": list(l.near_overlap), "top_overlap": list(l.top_overlap),
             "delta_norm_rel": _finite(l.delta_norm_rel), "delta_fro_rel": _finite(l.delta_fro_rel),
             "method": l.method, "seconds": l.seconds}
        if any(l.max_cos_bound):
            d["max_cos_bound"] = list(l.max_cos_bound)
        if l.max_cos_right:
            d["max_cos_right"] = list(l.max_cos_right)
            d["base_index_right"] = list(l.base_index_right)
        d.update({k: v for k, v in l.extra})
        layers.append(d)
    return {
        "$schema": SCHEMA_ID,
        "schema_version": report.schema_version or SCHEMA_VERSION,
        "tool_version": report.tool_version,
        "created": report.created,
        "command": report.command,
        "device": report.device,
        "seconds": report.seconds,
        "base": asdict(report.base),
        "tuned": asdict(report.tuned),
        "config": {"top_k": c.top_k, "epsilon": list(c.epsilons), "vectors": c.vectors,
                   "include": c.include, "exclude": c.exclude, "device": c.device,
                   "near_window": c.near_window, "allow_nonfinite": c.allow_nonfinite},
        "protocol": ("Algorithm 1 of Shuttleworth et al. (NeurIPS 2025): intruder iff max_i "
                     "|<u_t_j, u_0_i>| < epsilon over all base singular vectors, for the top_k "
                     "tuned vectors"),
        "layers": layers,
        "unpaired_base": list(report.unpaired_base),
        "unpaired_tuned": list(report.unpaired_tuned),
        "skipped": [{"name": n, "reason": r} for n, r in report.skipped],
        "warnings": list(report.warnings),
        "summary": summary(report),
    }


def dumps(report: ScanReport) -> str:
    return json.dumps(to_dict(report), indent=1, allow_nan=False)


def save_report(report: ScanReport, path: str) -> None:
    from ..io.atomic import write_text

    write_text(path, dumps(report) + "\n")


def validate(doc: Any, schema: Dict[str, Any] = SCHEMA, where: str = "$") -> None:
    """Check doc against the (subset of JSON Schema used by) SCHEMA; raise ReportError."""
    t = schema.get("type")
    ok = {"object": lambda v: isinstance(v, dict),
          "array": lambda v: isinstance(v, list),
          "string": lambda v: isinstance(v, str),
          "boolean": lambda v: isinstance(v, bool),
          "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v)}
    if isinstance(t, list):  # ["string", "null"]: None never reaches here (skipped below)
        t = next((x for x in t if x != "null" and ok[x](doc)), t[0])
    if t and not ok[t](doc):
        raise ReportError(f"{where}: expected {t}, got {type(doc).__name__}")
    if "enum" in schema and doc not in schema["enum"]:
        raise ReportError(f"{where}: {doc!r} is not one of {schema['enum']}")
    if "minimum" in schema and doc < schema["minimum"]:
        raise ReportError(f"{where}: {doc} is below the minimum {schema['minimum']}")
    if t == "object":
        for key in schema.get("required", ()):
            if key not in doc:
                raise ReportError(f"{where}: missing required field {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in doc and doc[key] is not None:
                validate(doc[key], sub, f"{where}.{key}")
    if t == "array":
        if len(doc) < schema.get("minItems", 0):
            raise ReportError(f"{where}: needs at least {schema['minItems']} item(s)")
        if "items" in schema:
            for i, item in enumerate(doc):
                validate(item, schema["items"], f"{where}[{i}]")


def from_dict(doc: Dict[str, Any], source: str = "report") -> ScanReport:
    """Rebuild a ScanReport from validated JSON data."""
    try:
        validate(doc)
    except ReportError as exc:
        raise ReportError(f"{source}: violates the scan-report schema: {exc}")
    major = str(doc["schema_version"]).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise ReportError(f"{source}: schema_version {doc['schema_version']} is not readable by "
                          f"this version (reads {SCHEMA_VERSION.split('.')[0]}.x)")
    validate_report(doc, source)  # relations between fields (intruder/report/validate.py)
    c = doc["config"]
    config = ScanConfig(top_k=c["top_k"], epsilons=tuple(float(e) for e in c["epsilon"]),
                        vectors=c.get("vectors", "left"), include=c.get("include"),
                        exclude=c.get("exclude"), device=c.get("device", "auto"),
                        near_window=c.get("near_window", 0.1),
                        allow_nonfinite=bool(c.get("allow_nonfinite", False)))
    known = {f.name for f in fields(LayerResult)}
    intr_known = {f.name for f in fields(Intruder)}
    layers = []
    for l in doc["layers"]:
        intr = tuple(Intruder(**{k: v for k, v in i.items() if k in intr_known})
                     for i in l["intruders"])
        counts = tuple(sorted((float(k), int(v)) for k, v in (l.get("counts_by_epsilon") or {}).items()))
        kw = {k: v for k, v in l.items() if k in known and k not in ("intruders", "counts_by_epsilon")}
        for k in ("shape", "max_cos", "base_index", "sigma_tuned", "sigma_base", "near_overlap",
                  "top_overlap", "max_cos_right", "base_index_right", "max_cos_bound"):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("delta_norm_rel", "delta_fro_rel"):
            if kw.get(k) is None:
                kw[k] = float("nan")
        extra = tuple((k, v) for k, v in l.items() if k not in known and k not in
                      ("intruders", "counts_by_epsilon"))
        kw.setdefault("dtype", "")
        kw.setdefault("status", "scanned")
        layers.append(LayerResult(intruders=intr, counts_by_epsilon=counts, extra=extra, **kw))
    ck = {f.name for f in fields(CheckpointInfo)}
    return ScanReport(
        base=CheckpointInfo(**{k: (tuple(v) if k in ("dtypes", "files") else v) for k, v in doc["base"].items() if k in ck}),
        tuned=CheckpointInfo(**{k: (tuple(v) if k in ("dtypes", "files") else v) for k, v in doc["tuned"].items() if k in ck}),
        config=config, layers=tuple(layers),
        unpaired_base=tuple(doc.get("unpaired_base", ())),
        unpaired_tuned=tuple(doc.get("unpaired_tuned", ())),
        skipped=tuple((s["name"], s["reason"]) for s in doc.get("skipped", ())),
        warnings=tuple(doc.get("warnings", ())), seconds=float(doc.get("seconds", 0.0)),
        device=doc.get("device", ""), created=doc.get("created", ""),
        command=doc.get("command", ""), tool_version=doc.get("tool_version", ""),
        schema_version=str(doc["schema_version"]))


def load_report(path: str) -> ScanReport:
    """Read and validate a scan report JSON file."""
    import os

    if not os.path.isfile(path):
        raise ReportError(f"{path}: no scan report there (run `intruder scan BASE TUNED` first)")
    from ..io.jsonfile import read_json

    doc = read_json(path, ReportError, "scan report", max_bytes=None)
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: violates the scan-report schema: $: expected object")
    try:
        return from_dict(doc, path)
    except (TypeError, ValueError, KeyError) as exc:
        raise ReportError(f"{path}: violates the scan-report schema ({exc.__class__.__name__}: {exc})")
