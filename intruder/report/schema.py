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
from typing import Any

from ..errors import ReportError
from ..io.atomic import write_text
from ..io.jsonfile import read_json
from ..types import CheckpointInfo, Intruder, LayerResult, Margin, ScanConfig, ScanReport, UpdateShape
from .scale_results import FORMAT as SCALE_FORMAT
from .scale_results import RESULT_FIELDS, ROLES, ROW_FIELDS, ROWS
from .summary import summary
from .validate import validate_report
from .verdict import from_dict as verdict_from_dict
from .verdict import to_dict as verdict_to_dict
from .verdict import verdict_of

SCHEMA_VERSION = "1.2"  # 1.1: margin + dW-spectrum layer fields, summary margin/provenance;
#                        1.2: the verdict; nullable fields declared as such; per-file sha256,
#                        content hash, hub repo_id / revision / commit, declared base
SCHEMA_ID = "https://github.com/intruder-tool/intruder/schema/scan-report-1.json"

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_NNUM = {"type": ["number", "null"]}  # null: not defined for this matrix (or not finite)
_NINT = {"type": ["integer", "null"]}
_NSTR = {"type": ["string", "null"]}
_NUMS = {"type": "array", "items": _NUM}
_INTS = {"type": "array", "items": _INT}
_STRS = {"type": "array", "items": _STR}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
_UPDATE = ["lora-like", "full-ft-like", "mixed", "unresolved", "unchanged", "precision-only",
           "unknown"]
_CKPT = {"type": "object", "required": ["path", "kind", "n_tensors", "fingerprint"],
         "properties": {"path": _STR, "kind": _STR, "n_tensors": _INT, "bytes": _INT,
                        "fingerprint": _STR, "dtypes": _STRS,
                        "adapter": {"type": ["object", "null"]},
                        # 1.2: content identity and hub source (io/identity.py, io/hub.py,
                        # io/basecheck.py); fingerprint: first 16 hex digits of sha256
                        "sha256": _NSTR,  # sha256 of the sorted per-file sha256 digests
                        "files": {"type": "array", "items": {
                            "type": "object", "required": ["name", "sha256"],
                            "properties": {"name": _STR, "bytes": _INT, "sha256": _STR}}},
                        "repo_id": _NSTR, "revision": _NSTR, "commit": _NSTR,
                        "declared_base": {"type": ["object", "null"], "properties": {
                            "declared": _NSTR, "resolved": _NSTR, "given": _STR,
                            "status": {"enum": ["match", "mismatch", "unverified",
                                                "undeclared"]},
                            "by": _STR, "detail": _STR}}}}
_INTRUDER = {"type": "object", "required": ["index", "sigma", "max_cos", "base_index"],
             "properties": {"index": {"type": "integer", "minimum": 0}, "sigma": _NUM,
                            "max_cos": _NUM, "base_index": _INT,
                            "side": {"enum": ["left", "right"]},
                            "near_overlap": _NUM, "top_overlap": _NUM, "in_cluster": _BOOL,
                            "max_cos_bound": _BOOL}}
_LAYER = {"type": "object", "required": ["name", "shape", "max_cos", "intruders"],
          "properties": {"name": _STR, "shape": _INTS, "dtype": _STR,
                         "status": {"enum": ["scanned", "unchanged", "nonfinite"]},
                         "max_cos": _NUMS, "base_index": _INTS,
                         "max_cos_right": _NUMS, "base_index_right": _INTS,
                         "sigma_tuned": _NUMS, "sigma_base": _NUMS,
                         "near_overlap": _NUMS, "top_overlap": _NUMS,
                         "intruders": {"type": "array", "items": _INTRUDER},
                         "counts_by_epsilon": _COUNTS,
                         "intruder_energy": _NUM,
                         "delta_norm_rel": _NNUM,  # ||Wt - W0||_2 / sigma_k(W0)
                         "delta_fro_rel": _NNUM,  # ||Wt - W0||_F / ||W0||_F
                         "method": _STR, "seconds": _NUM,
                         # 1.1, intruder/spectral/margin.py and docs/margin.md
                         "min_max_cos": _NNUM,  # lowest max|cos| = epsilon of the first intruder
                         "cos_margin": _NNUM,  # min_max_cos - epsilon (< 0: has intruders)
                         "novel_strength": _NNUM,  # ||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0)
                         "subspace_cos": _NNUM,  # cos of the largest principal angle, top-k
                         "delta_stable_rank": _NNUM,  # ||dW||_F^2 / ||dW||_2^2
                         "weight_cos": _NNUM,  # <W0, Wt> / (||W0||_F ||Wt||_F)
                         "delta_rank": _NINT,  # singular values of dW above delta_floor
                         "delta_rank_seen": {"type": ["boolean", "null"]},  # a value below seen
                         "delta_rank_gap": _NNUM,  # sv[rank-1] / sv[rank]
                         "delta_tail_ratio": _NNUM,  # energy beyond the rank / rounding energy
                         "delta_next_edge": _NNUM,  # sv[rank] / rounding-noise edge
                         "delta_floor": _NNUM,  # rounding-noise edge of the tuned storage dtype
                         "delta_grid": _NSTR,  # storage grid of Wt: bfloat16|float16|float32|float64
                         "delta_sv_method": {"enum": ["gram", "randomized", None]},
                         "delta_sv": _NUMS,  # top 64 of dW
                         # engine: per max_cos entry, true where the value is a certified upper
                         # bound (spectral slices; decisions exact); absent when all are exact
                         "max_cos_bound": {"type": "array", "items": _BOOL},
                         # quantized / scaled storage decoded before the analysis (io/dequant.py,
                         # io/gguf.py), e.g. "fp8_e4m3 per-channel scale", "gguf Q8_0"; only on
                         # layers where a side was stored that way
                         "storage_base": _STR, "storage_tuned": _STR}}
_QUANT = {"type": "object", "additionalProperties": _NUM}
_MARGIN = {"type": "object", "required": ["layers"], "properties": {
    "layers": _INT, "epsilon": _NUM, "first_intruder_epsilon": _NUM, "cos_margin": _NUM,
    "closest_layer": _STR, "strongest_layer": _STR, "min_max_cos_quantiles": _QUANT,
    "novel_strength_quantiles": _QUANT, "layers_below_cos_margin": _COUNTS,
    "layers_novel_strength_at_least": _COUNTS}}
_PROVENANCE = {"type": "object", "required": ["verdict", "confidence"], "properties": {
    "verdict": {"enum": _UPDATE}, "confidence": _NUM, "estimated_rank": _NINT,
    "rank_range": {"type": ["array", "null"], "items": _INT, "minItems": 2, "maxItems": 2},
    "rank_by_module": {"type": "object", "additionalProperties": _INT},
    "kind_by_module": {"type": "object", "additionalProperties": _STR},
    "adapted_modules": _STRS, "untouched_modules": _STRS, "counts": _COUNTS,
    "declared": {"type": ["object", "null"]}, "evidence": _STRS}}
VERDICT_LABELS = ["lora-like", "full-ft-like", "mixed", "unresolved", "precision-only",
                  "unchanged", "unrelated", "empty", "unknown"]
_VERDICT = {"type": "object",
            "required": ["label", "wording", "confidence", "evidence", "epsilon", "intruders"],
            "properties": {"label": {"enum": VERDICT_LABELS}, "wording": _STR,
                           "confidence": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                           "evidence": _STRS, "epsilon": _NUM,
                           "intruders": {"type": "integer", "minimum": 0},
                           "matrices_with_intruders": _INT, "matrices_changed": _INT,
                           "lowest_max_cos": _NNUM, "margin": _NNUM, "novel_strength": _NNUM,
                           "update": {"enum": _UPDATE}, "estimated_rank": _NINT,
                           "agree": _BOOL}}
_SUMMARY = {"type": "object",
            "required": ["layers_scanned", "total_intruders", "counts_by_epsilon"],
            "properties": {"layers_scanned": _INT, "layers_unchanged": _INT,
                           "layers_nonfinite": _INT, "layers_with_intruders": _INT,
                           "total_intruders": _INT, "in_cluster_intruders": _INT,
                           "counts_by_epsilon": _COUNTS, "min_max_cos": _NNUM,
                           "mean_intruder_energy": _NUM, "seconds": _NUM,
                           "margin": _MARGIN, "provenance": _PROVENANCE}}
SCAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema_version", "base", "tuned", "config", "layers", "summary"],
    "properties": {
        "$schema": _STR,
        "schema_version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+$"},
        "tool_version": _STR, "created": _STR, "command": _STR, "device": _STR, "seconds": _NUM,
        "protocol": _STR,
        "base": _CKPT,
        "tuned": _CKPT,
        "config": {"type": "object", "required": ["top_k", "epsilon"],
                   "properties": {"top_k": {"type": "integer", "minimum": 1},
                                  "epsilon": {"type": "array", "minItems": 1, "items": {
                                      "type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                                  "vectors": {"enum": ["left", "right", "both"]},
                                  "include": _NSTR, "exclude": _NSTR, "device": _STR,
                                  "near_window": _NUM, "allow_nonfinite": _BOOL}},
        "layers": {"type": "array", "items": _LAYER},
        "unpaired_base": _STRS, "unpaired_tuned": _STRS,
        "skipped": {"type": "array", "items": {"type": "object", "required": ["name", "reason"],
                                               "properties": {"name": _STR, "reason": _STR}}},
        "warnings": _STRS,
        "summary": _SUMMARY,
        "verdict": _VERDICT,  # 1.2
    },
}
_ROW = {"type": "object", "required": ["label", "path", "intruders", "provenance"], "properties": {
    "label": _STR, "path": _STR, "kind": _STR, "intruders": _INT, "layers_with_intruders": _INT,
    "counts_by_epsilon": _COUNTS, "min_max_cos": _NNUM, "mean_intruder_energy": _NUM,
    "novel_strength_max": _NNUM, "layers_scanned": _INT, "layers_unchanged": _INT,
    "provenance": _PROVENANCE, "verdict": _VERDICT, "warnings": _STRS,
    "vs_previous": {"type": ["object", "null"], "properties": {
        "intruders": _INT, "counts_by_epsilon": _COUNTS, "min_max_cos": _NNUM,
        "provenance": _PROVENANCE}},
    "persistent": _INT, "new": _INT, "gone": _INT}}
_PERSIST = {"type": "object", "properties": {"persistent": _INTS, "new": _INTS, "gone": _INTS,
                                             "match_cos": _NUMS}}
TRACK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["kind", "track_schema_version", "base", "config", "entries"],
    "properties": {
        "kind": {"enum": ["intruder-track", "intruder-compare"]},
        "track_schema_version": _STR, "tool_version": _STR, "created": _STR, "command": _STR,
        "device": _STR, "seconds": _NUM, "base": _CKPT,
        "config": {"type": "object", "required": ["top_k", "epsilon"], "properties": {
            "top_k": {"type": "integer", "minimum": 1},
            "epsilon": {"type": "array", "items": _NUM, "minItems": 1},
            "vectors": {"enum": ["left", "right", "both"]}, "include": _NSTR, "exclude": _NSTR}},
        "persist_cos": _NNUM,
        "entries": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["label", "path", "summary", "vs_base"],
            "properties": {"label": _STR, "path": _STR, "summary": _ROW,
                           "vs_base": {"$ref": "#/$defs/scan"},
                           "vs_previous": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/scan"}]},
                           "persistence": {"type": "object", "additionalProperties": _PERSIST}}}},
    },
}
# the scale-results file as intruder.report.scale_results declares it (FORMAT, ROWS, ROW_FIELDS,
# ROLES, RESULT_FIELDS), which its writer and its reader share
_RESULT = {"type": "object", "required": list(RESULT_FIELDS), "properties": {
    "evaluator": _STR, "metric": _STR, "value": _NNUM, "n_units": _INT, "unit": _STR,
    "protocol": _STR, "extra": {"type": "object"}}}
SCALE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["format", "intervention", "base", "tuned", "alphas", ROWS],
    "properties": {
        "format": {"const": SCALE_FORMAT},
        "tool_version": _STR, "created": _STR, "intervention": _STR, "base": _STR, "tuned": _STR,
        "tuned_kind": _STR, "scan_report": _STR, "epsilon": _NUM,
        "top_k": {"type": "integer", "minimum": 1}, "alphas": _NUMS, "evals": _STRS,
        "limit": _NINT,
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "alpha": _NUM, "path": _STR, "kind": _STR, "tensors": _INT, "bytes": _INT,
            "intruders": _INT, "warnings": _STRS,
            "layers": {"type": "array", "items": {"type": "object", "properties": {
                "name": _STR, "indices": _INTS, "sigma": _NUMS, "rel_change": _NUM}}}}}},
        ROWS: {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": list(ROW_FIELDS), "properties": {
                "label": _STR, "role": {"enum": list(ROLES)}, "alpha": _NNUM,
                "path": _STR, "n_intruders": _NINT, "n_matrices": _NINT,
                "max_rel_change": _NNUM, "note": _STR,
                "results": {"type": "array", "items": _RESULT}}}},
        "files": {"type": "object", "additionalProperties": _STR},
    },
}
# the scan-report schema alone, as a standalone document (what load_report checks)
SCAN_SCHEMA_DOC: dict[str, Any] = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                                   "$defs": {"scan": SCAN_SCHEMA}, "$ref": "#/$defs/scan"}
# The published schema: one document for every JSON report the tool writes. A scan report is
# the default; a track / compare carries `kind`, a scale-results file `intervention`.
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SCHEMA_ID,
    "title": "intruder report (scan, compare, track, scale results)",
    "$defs": {"scan": SCAN_SCHEMA, "track": TRACK_SCHEMA, "scale": SCALE_SCHEMA,
              "verdict": _VERDICT},
    "if": {"type": "object", "required": ["kind"]},
    "then": {"$ref": "#/$defs/track"},
    "else": {"if": {"type": "object", "required": ["intervention"]},
             "then": {"$ref": "#/$defs/scale"},
             "else": {"$ref": "#/$defs/scan"}},
}


def _finite(x: float):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


# the per-matrix JSON keys of the typed measures, in the order they are written
MARGIN_KEYS = tuple(f.name for f in fields(Margin))  # same names
UPDATE_KEYS = tuple(f"delta_{f.name}" for f in fields(UpdateShape))  # delta_rank, delta_sv ...
STORAGE_KEYS = ("storage_base", "storage_tuned")
MEASURE_KEYS = MARGIN_KEYS + UPDATE_KEYS + STORAGE_KEYS


def layer_measures(l: LayerResult) -> dict[str, Any]:
    """The margin, update-shape and storage measures of a layer under their JSON keys (only
    those it has: no margin or update shape on unchanged / non-finite matrices, no storage
    keys for plain float storage, no subspace_cos when it was not computed)."""
    out: dict[str, Any] = {}
    if l.margin is not None:
        out.update((k, v) for k, v in zip(MARGIN_KEYS, _values(l.margin))
                   if not (k == "subspace_cos" and v is None))
    if l.update_shape is not None:
        out.update((k, list(v) if isinstance(v, tuple) else v)
                   for k, v in zip(UPDATE_KEYS, _values(l.update_shape)))
    for k, v in zip(STORAGE_KEYS, (l.storage_base, l.storage_tuned)):
        if v is not None:
            out[k] = v
    return out


def _values(obj) -> tuple[Any, ...]:
    """A dataclass's field values in order (dataclasses.astuple would copy them deeply)."""
    return tuple(getattr(obj, f.name) for f in fields(obj))


def _layer_measures_from(l: dict[str, Any]) -> dict[str, Any]:
    """LayerResult keyword arguments for the measures of a JSON layer (layer_measures undone);
    a report written before a measure existed (schema 1.0: none of them) leaves it None."""
    kw: dict[str, Any] = {}
    if any(k in l for k in MARGIN_KEYS):
        kw["margin"] = Margin(**{k: l[k] for k in MARGIN_KEYS if k in l})
    if any(k in l for k in UPDATE_KEYS):
        got = {k[len("delta_"):]: l[k] for k in UPDATE_KEYS if k in l}
        if "sv" in got:
            got["sv"] = tuple(got["sv"])
        kw["update_shape"] = UpdateShape(**got)
    kw.update((k, l[k]) for k in STORAGE_KEYS if k in l)
    return kw


def to_dict(report: ScanReport) -> dict[str, Any]:
    """The report as plain JSON-ready data."""
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
        d.update(layer_measures(l))
        layers.append(d)
    return {
        "$schema": SCHEMA_ID,
        "schema_version": SCHEMA_VERSION,
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
        "verdict": verdict_to_dict(verdict_of(report)),
    }


def dumps(report: ScanReport) -> str:
    return json.dumps(to_dict(report), indent=1, allow_nan=False)


def save_report(report: ScanReport, path: str) -> None:
    write_text(path, dumps(report) + "\n")


_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


def _where(path) -> str:
    out = "$"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _message(err) -> str:
    """One line naming where the document breaks the schema and how."""
    where = _where(err.absolute_path)
    v, inst = err.validator, err.instance
    if v == "type":
        want = err.validator_value
        want = " or ".join(want) if isinstance(want, list) else want
        return f"{where}: expected {want}, got {_TYPE_NAMES.get(type(inst), type(inst).__name__)}"
    if v == "required":
        missing = [k for k in err.validator_value if isinstance(inst, dict) and k not in inst]
        return f"{where}: missing required field {(missing or ['?'])[0]!r}"
    if v in ("minimum", "exclusiveMinimum"):
        return f"{where}: {inst!r} is below the minimum {err.validator_value}"
    if v in ("maximum", "exclusiveMaximum"):
        return f"{where}: {inst!r} is above the maximum {err.validator_value}"
    if v == "enum":
        return f"{where}: {inst!r} is not one of {err.validator_value}"
    return f"{where}: {err.message[:200]}"


_VALIDATORS: dict[int, Any] = {}


def validator(schema: dict[str, Any] | None = None):
    """The Draft 2020-12 validator of `schema` (default SCHEMA), built once."""
    schema = SCHEMA if schema is None else schema
    v = _VALIDATORS.get(id(schema))
    if v is None:
        from jsonschema import Draft202012Validator

        Draft202012Validator.check_schema(schema)
        v = _VALIDATORS[id(schema)] = Draft202012Validator(schema)
    return v


def validate(doc: Any, schema: dict[str, Any] | None = None) -> None:
    """Check a report document (scan, compare, track or scale results) against the published
    JSON Schema (Draft 2020-12; `schema` to check against another); raise ReportError naming the
    first violation. JSON itself cannot hold NaN or Infinity, which read_json refuses."""
    from jsonschema.exceptions import best_match

    bad = _first_nonfinite(doc, "$")
    if bad is not None:
        raise ReportError(f"{bad[0]}: expected number, got {bad[1]} (not valid JSON)")
    err = best_match(validator(schema).iter_errors(doc), key=lambda e: -len(e.absolute_path))
    if err is not None:
        raise ReportError(_message(err))


def _first_nonfinite(doc: Any, where: str):
    """(path, value) of the first NaN or infinity (Python's JSON reader accepts them)."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return where, repr(doc)
    if isinstance(doc, dict):
        items = ((f"{where}.{k}", v) for k, v in doc.items())
    elif isinstance(doc, list):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(doc))
    else:
        return None
    for w, v in items:
        if isinstance(v, (dict, list, float)):
            bad = _first_nonfinite(v, w)
            if bad is not None:
                return bad
    return None


def _checkpoint_info(d: dict[str, Any], known: set[str]) -> CheckpointInfo:
    """A CheckpointInfo from its JSON object (lists back to tuples, unknown keys dropped)."""
    fields: dict[str, Any] = {k: (tuple(v) if k in ("dtypes", "files") else v)
                              for k, v in d.items() if k in known}  # JSON values, schema-checked
    return CheckpointInfo(**fields)


def from_dict(doc: dict[str, Any], source: str = "report") -> ScanReport:
    """Rebuild a ScanReport from validated JSON data."""
    try:
        validate(doc, SCAN_SCHEMA_DOC)
    except ReportError as exc:
        raise ReportError(f"{source}: violates the scan-report schema: {exc}") from exc
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
    # LayerResult fields stored as themselves (the measures are mapped by _layer_measures_from)
    known = {f.name for f in fields(LayerResult)} - {"margin", "update_shape", *STORAGE_KEYS}
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
        kw.update(_layer_measures_from(l))
        kw.setdefault("dtype", "")
        kw.setdefault("status", "scanned")
        layers.append(LayerResult(intruders=intr, counts_by_epsilon=counts, **kw))
    ck = {f.name for f in fields(CheckpointInfo)}
    return ScanReport(
        base=_checkpoint_info(doc["base"], ck),
        tuned=_checkpoint_info(doc["tuned"], ck),
        config=config, layers=tuple(layers),
        unpaired_base=tuple(doc.get("unpaired_base", ())),
        unpaired_tuned=tuple(doc.get("unpaired_tuned", ())),
        skipped=tuple((s["name"], s["reason"]) for s in doc.get("skipped", ())),
        warnings=tuple(doc.get("warnings", ())), seconds=float(doc.get("seconds", 0.0)),
        device=doc.get("device", ""), created=doc.get("created", ""),
        command=doc.get("command", ""), tool_version=doc.get("tool_version", ""),
        schema_version=str(doc["schema_version"]),
        verdict=verdict_from_dict(doc["verdict"]) if doc.get("verdict") else None)


def load_report(path: str) -> ScanReport:
    """Read and validate a scan report JSON file."""
    import os

    if not os.path.isfile(path):
        raise ReportError(f"{path}: no scan report there (run `intruder scan BASE TUNED` first)")
    doc = read_json(path, ReportError, "scan report", max_bytes=None)
    if not isinstance(doc, dict):
        raise ReportError(f"{path}: violates the scan-report schema: $: expected object")
    try:
        return from_dict(doc, path)
    except (TypeError, ValueError, KeyError) as exc:
        raise ReportError(f"{path}: violates the scan-report schema ({exc.__class__.__name__}: {exc})") from exc
