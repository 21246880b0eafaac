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

# hand edits that keep the JSON Schema but contradict the report's own fields -> the field that
# the one-line error must name (intruder/report/validate.py)
# (the schema's own bounds, where it has them, may name the same field first)
SEMANTIC_EDITS = {"epsilon_above_one": r"config\.epsilon\[0\]: 1\.5 is (outside \(0, 1\]|above "
                                       r"the maximum 1)",
                  "top_k_huge": r"config\.top_k: 1000000000000000000 is outside",
                  "shape_negative": r"layers\[0\]\.shape: \[-4, 32\] holds a dimension",
                  "shape_empty": r"layers\[0\]\.shape: \[\] is not the shape of a matrix",
                  "index_999": r"layers\[0\]\.intruders\[0\]\.index: 999 is outside the top-2",
                  "index_negative": r"layers\[0\]\.intruders\[0\]\.index: -1 is (outside|below "
                                    r"the minimum 0)",
                  "index_twice": r"layers\[0\]\.intruders\[1\]\.index: rank 0 is listed twice",
                  "arrays_inconsistent": r"layers\[0\]\.base_index: 1 values where max_cos has 2",
                  "max_cos_above_one": r"layers\[0\]\.max_cos\[1\]: 1\.5 is not a \|cos\|",
                  "sigma_increasing": r"layers\[0\]\.sigma_tuned\[1\]: 4\.0 is above",
                  "nesting_bomb": r"not valid JSON \(nested more than 64 levels deep\)",
                  "deep_nesting_bomb": r"not valid JSON \(nested too deeply\)",
                  "float_overflow": r"not valid JSON \(the number 1e999 is beyond"}


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
    elif edit in SEMANTIC_EDITS:
        doc["schema_version"] = "1.0"
        layer["sigma_tuned"] = [3.0, 2.0]
        return _semantic(path, edit, doc, layer, write_json)
    else:
        raise ValueError(edit)
    return write_json(path, doc)


def _semantic(path, edit, doc, layer, write_json) -> str:
    if edit == "epsilon_above_one":
        doc["config"]["epsilon"] = [1.5]
    elif edit == "top_k_huge":
        doc["config"]["top_k"] = 10 ** 18
    elif edit == "shape_negative":
        layer["shape"] = [-4, 32]
    elif edit == "shape_empty":
        layer["shape"] = []
    elif edit == "index_999":
        layer["intruders"][0]["index"] = 999
    elif edit == "index_negative":
        layer["intruders"][0]["index"] = -1
    elif edit == "index_twice":
        layer["intruders"].append(dict(layer["intruders"][0]))
    elif edit == "arrays_inconsistent":
        layer["base_index"] = [5]
    elif edit == "max_cos_above_one":
        layer["max_cos"][1] = 1.5
    elif edit == "sigma_increasing":
        layer["sigma_tuned"] = [3.0, 4.0]
    elif edit == "nesting_bomb":
        layer["extra_note"] = json.loads("[" * 100 + "]" * 100)
    elif edit == "deep_nesting_bomb":  # deeper than the parser's recursion limit
        text = json.dumps(doc)
        return write_json(path, text[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    elif edit == "float_overflow":
        return write_json(path, json.dumps(doc).replace('"sigma": 3.0', '"sigma": 1e999'))
    return write_json(path, doc)
