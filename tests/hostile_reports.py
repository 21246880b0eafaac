"""Hand-edited scan reports that break the JSON schema, each with what the one-line error
must say: part of the hostile corpus (tests/hostile_corpus.py re-exports both names)."""

from __future__ import annotations

import json

# hand edits of a scan report -> what the one-line error must say
REPORT_EDITS = {"max_cos_string": r"max_cos\[0\]: expected number",
                "no_layers": "missing required field 'layers'",
                "top_k_zero": "top_k.*below the minimum",
                "intruder_index_float": r"intruders\[0\]\.index: expected integer",
                "future_major": "schema_version 9.0 is not readable",
                "nan": "expected number|not valid JSON",
                "huge_number": "not valid JSON",
                "not_json": "not valid JSON"}


def hand_edited_report(path: str, edit: str) -> str:
    """A scan report (schema 1.x) with one hand edit that violates the schema."""
    from hostile_corpus import HIDDEN, write_json

    ck = {"path": "x", "kind": "safetensors", "n_tensors": 1, "bytes": 4, "fingerprint": "0" * 16,
          "dtypes": ["F32"]}
    layer = {"name": "model.layers.0.self_attn.q_proj.weight", "shape": [HIDDEN, HIDDEN],
             "status": "scanned", "max_cos": [0.2, 0.9], "base_index": [5, 1],
             "intruders": [{"index": 0, "sigma": 3.0, "max_cos": 0.2, "base_index": 5}],
             "counts_by_epsilon": {"0.5": 1}}
    doc = {"schema_version": "1.0", "base": dict(ck), "tuned": dict(ck),
           "config": {"top_k": 2, "epsilon": [0.5], "vectors": "left"}, "layers": [layer],
           "summary": {"layers_scanned": 1, "total_intruders": 1, "counts_by_epsilon": {"0.5": 1}}}
    if edit == "max_cos_string":
        layer["max_cos"][0] = "0.2"
    elif edit == "no_layers":
        del doc["layers"]
    elif edit == "top_k_zero":
        doc["config"]["top_k"] = 0
    elif edit == "intruder_index_float":
        layer["intruders"][0]["index"] = 0.5
    elif edit == "future_major":
        doc["schema_version"] = "9.0"
    elif edit == "not_json":
        return write_json(path, '{"schema_version": "1.0", "layers": [')
    elif edit == "huge_number":
        text = json.dumps(doc).replace('"max_cos": [0.2', '"max_cos": [' + "7" * 5000)
        return write_json(path, text)
    elif edit == "nan":
        layer["max_cos"][0] = float("nan")  # json.dump writes NaN, which JSON does not allow
    else:
        raise ValueError(edit)
    return write_json(path, doc)
