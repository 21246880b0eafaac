"""Hand-edited scan reports that break the JSON schema or contradict themselves, each with what
the one-line error must say: part of the hostile corpus (tests/hostile_corpus.py re-exports the
first two names); and a scanned pair with the CLI helpers the hostile output tests share."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# ---------------------------------------------------------------- a scanned pair and the CLI


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def scanned_pair(d: str) -> dict:
    """base/tuned .safetensors (fine-tune noise large enough for intruders at epsilon 0.9),
    another fine-tune of the same layout, a model directory holding the base, and a scan report
    of base/tuned, all under `d`; `snapshot` holds the inputs' sha256."""
    import numpy as np
    from hostile_corpus import model_tensors, write_json, write_st

    from intruder.report.schema import save_report
    from intruder.scan import run_scan
    from intruder.types import ScanConfig

    rng = np.random.default_rng(1)
    base_t = model_tensors(0)
    tuned_t, other_t = ({k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
                         for k, v in base_t.items()} for _ in range(2))
    j = lambda *p: os.path.join(d, *p)  # noqa: E731
    p = {"dir": d, "base": write_st(j("base.safetensors"), base_t),
         "tuned": write_st(j("tuned.safetensors"), tuned_t),
         "other": write_st(j("other-finetune.safetensors"), other_t)}
    write_st(j("base-dir", "model.safetensors"), base_t)
    write_json(j("base-dir", "config.json"), {"model_type": "llama"})
    p["base_dir"] = j("base-dir")
    rep = run_scan(p["base"], p["tuned"], ScanConfig(epsilons=(0.9,), device="cpu"))
    assert sum(len(l.intruders) for l in rep.layers) > 0
    p["report"] = j("scan.json")
    save_report(rep, p["report"])
    p["snapshot"] = {k: sha(p[k]) for k in ("base", "tuned", "report")}
    return p


def private_cache(prefix: str):
    """For a test module: a fresh cache folder (never the user's ~/.cache/intruder), the
    environment for CLI subprocesses (this checkout first on PYTHONPATH, one OpenMP thread, that
    cache), and two autouse fixtures: in-process runs use the cache; it is removed after the
    module. Use as `CACHE, ENV, _private_cache, _remove_cache = private_cache("prefix-")`."""
    import pytest  # here, not at the top: tests/hostile_corpus.py also runs as a plain script

    cache = tempfile.mkdtemp(prefix=prefix)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", INTRUDER_CACHE_DIR=cache)

    @pytest.fixture(autouse=True, name="_private_cache")
    def use_cache(monkeypatch):
        monkeypatch.setenv("INTRUDER_CACHE_DIR", cache)

    @pytest.fixture(scope="module", autouse=True, name="_remove_cache")
    def remove_cache():
        yield
        shutil.rmtree(cache, ignore_errors=True)

    return cache, env, use_cache, remove_cache


def run_cli(args):
    """`intruder ARGS` in process."""
    from click.testing import CliRunner

    from intruder.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(res) -> str:
    """The one error line of a failed command (asserting there is exactly one)."""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: "), lines[0]
    assert "Traceback" not in res.output
    return lines[0]
