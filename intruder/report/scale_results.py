"""The scale-results file (`intruder scale ... --eval`): its declaration, and its reader.

Declared once here and used by both sides: the file names, the FORMAT tag, the key the model
rows are under (ROWS), a row's fields (ROW_FIELDS, `row_entry`) and roles (ROLES), the fields of
one evaluator result (RESULT_FIELDS, `result_entry`), and the ONE metric preference
(`choose_axes`) that picks the trade-off plot's axes, so the PNG the sweep writes
(intruder.scale_sweep) and the HTML audit's plot show the same two metrics.

The reader reads exactly that declaration: a JSON object tagged `format: FORMAT`, its rows under
ROWS, each row's `role` one of ROLES and its `results` a list of result entries. Anything else
(another tool's JSON, a hand-made table, a row or result missing a declared field) is one
ReportError naming the file and what is wrong; nothing is guessed from metric or row names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from ..errors import ReportError
from ..io.jsonfile import read_json

FORMAT = "intruder.scale-results/1"
RESULTS_JSON = "scale-results.json"
RESULTS_CSV = "scale-results.csv"
PLOT_PNG = "scale-tradeoff.png"
RESULT_FIELDS = ("evaluator", "metric", "value", "n_units", "unit", "protocol", "extra")
ROWS = "models"  # the top-level key holding the model rows
ROLES = ("base", "tuned", "scaled")  # a row's `role`: the base, the tuned model, one alpha
ROW_FIELDS = ("label", "role", "alpha", "path", "n_intruders", "n_matrices", "max_rel_change",
              "note", "results")
# the metric preference, in order, for the plot's x (pre-training side) and y (task side)
PRETRAIN_PREFERRED = ("word_perplexity", "bits_per_byte", "byte_perplexity", "token_perplexity")
TASK_PREFERRED = ("accuracy", "acc", "acc_norm", "exact_match", "next_token_accuracy",
                  "token_loss")


def is_task_evaluator(evaluator: str) -> bool:
    """task:NAME files and lm-eval:TASK tasks are the task side."""
    e = evaluator.lower()
    return e.startswith("task") or e.startswith("lm-eval:")


def choose_axes(keys: Iterable[tuple[str, str]]) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(x, y) among (evaluator, metric) keys: the first pre-training metric by preference (not
    from a task), the first task metric by preference (not a perplexity). Either may be None."""
    keys = list(keys)
    x = next((k for m in PRETRAIN_PREFERRED for k in keys
              if k[1] == m and not (is_task_evaluator(k[0]) and not k[0].endswith(":wikitext"))),
             None)
    y = next((k for m in TASK_PREFERRED for k in keys
              if k[1] == m and is_task_evaluator(k[0]) and k != x), None)
    return x, y


def result_entry(r) -> dict[str, Any]:
    """One EvalResult as the file stores it (RESULT_FIELDS; a non-finite value as null)."""
    return dict(evaluator=r.evaluator, metric=r.metric, value=_num(r.value), n_units=r.n_units,
                unit=r.unit, protocol=r.protocol, extra={k: v for k, v in r.extra})


def row_entry(row) -> dict[str, Any]:
    """One model row (intruder.scale_sweep.ModelRow) as the file stores it (ROW_FIELDS)."""
    out = {f: getattr(row, f) for f in ROW_FIELDS if f != "results"}
    out["results"] = [result_entry(r) for r in row.results]
    return out


@dataclass(frozen=True)
class ScalePoint:
    label: str  # 'base', 'tuned (alpha = 1)', 'alpha = 0.5'
    role: str  # one of ROLES: base | tuned | scaled
    alpha: float | None
    metrics: tuple[tuple[str, float], ...]  # (name, value), name like 'wikitext/word_perplexity'
    intruders: int | None = None  # directions rescaled (scaled rows)
    note: str = ""

    def get(self, name: str) -> float | None:
        return dict(self.metrics).get(name)


@dataclass(frozen=True)
class ScaleTable:
    source: str
    points: tuple[ScalePoint, ...]
    metrics: tuple[str, ...]  # every metric name, first-seen order
    x_metric: str | None  # pre-training side (forgetting)
    y_metric: str | None  # task side
    protocols: tuple[tuple[str, str], ...]  # (metric name, protocol text)
    epsilon: float | None = None  # threshold whose intruders were rescaled
    intervention: str = ""  # the formula


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _fail(source: str, what: str) -> NoReturn:
    raise ReportError(f"{source}: {what}")


def check_format(doc: Any, source: str) -> None:
    """Refuse (ReportError) a document that is not tagged `format: FORMAT`."""
    if not isinstance(doc, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
            type(doc), "number")
        _fail(source, f"not an intruder scale-results file (a JSON {kind}, expected an object "
                      f"tagged format {FORMAT!r})")
    tag = doc.get("format")
    if tag != FORMAT:
        what = "no format tag" if tag is None else f"format tag {tag!r}"
        _fail(source, f"not an intruder scale-results file ({what}, expected {FORMAT!r})")


def _rows(doc: Any, source: str) -> list[dict[str, Any]]:
    """The model rows of a scale-results document, every one checked against the declaration."""
    check_format(doc, source)
    if not isinstance(doc.get("intervention"), str):
        _fail(source, "'intervention' must be the formula text")
    if doc.get("epsilon") is not None and _num(doc["epsilon"]) is None:
        _fail(source, f"'epsilon' must be a number, got {doc['epsilon']!r}")
    rows = doc.get(ROWS)
    if not isinstance(rows, list) or not rows:
        _fail(source, f"{ROWS!r} must be a non-empty list of model rows")
    for i, row in enumerate(rows):
        _check_row(row, f"{ROWS}[{i}]", source)
    return rows


def _declared(obj: Any, fields: tuple[str, ...], what: str, where: str,
              source: str) -> dict[str, Any]:
    """`obj` as an object holding every declared field of a `what`, else one ReportError."""
    if not isinstance(obj, dict):
        _fail(source, f"{where}: expected an object with {', '.join(fields)}")
    missing = [f for f in fields if f not in obj]
    if missing:
        _fail(source, f"{where}: missing {missing[0]!r} (a {what} holds {', '.join(fields)})")
    return obj


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_row(row: Any, where: str, source: str) -> None:
    row = _declared(row, ROW_FIELDS, "row", where, source)
    if row["role"] not in ROLES:
        _fail(source, f"{where}: role {row['role']!r} is not one of {', '.join(ROLES)}")
    alpha = row["alpha"]
    if (alpha is None and row["role"] != "base") or (alpha is not None and _num(alpha) is None):
        _fail(source, f"{where}: alpha must be a number{' or null' if row['role'] == 'base' else ''}"
                      f", got {alpha!r}")
    for f, kind in (("label", str), ("note", str), ("path", str), ("results", list)):
        if not isinstance(row[f], kind):
            _fail(source, f"{where}: {f!r} must be a {'list' if kind is list else 'string'}")
    if row["n_intruders"] is not None and not _whole(row["n_intruders"]):
        _fail(source, f"{where}: 'n_intruders' must be a whole number or null")
    for j, e in enumerate(row["results"]):
        at = f"{where}.results[{j}]"
        e = _declared(e, RESULT_FIELDS, "result", at, source)
        for f in ("evaluator", "metric", "unit", "protocol"):
            if not isinstance(e[f], str):
                _fail(source, f"{at}: {f!r} must be a string")
        if e["value"] is not None and _num(e["value"]) is None:
            _fail(source, f"{at}: 'value' must be a number or null, got {e['value']!r}")
        if not _whole(e["n_units"]):
            _fail(source, f"{at}: 'n_units' must be a whole number")


def _key(name: str) -> tuple[str, str]:
    """'task:siqa/accuracy' -> ('task:siqa', 'accuracy'), the (evaluator, metric) choose_axes takes."""
    evaluator, _, metric = name.rpartition("/")
    return evaluator, metric


def _label(row: dict[str, Any]) -> str:
    if row["role"] == "base":
        return "base"
    return "tuned (alpha = 1)" if row["role"] == "tuned" else f"alpha = {row['alpha']:g}"


def parse_scale_results(doc: Any, source: str = "scale results") -> ScaleTable:
    """Build a ScaleTable from a parsed scale-results document (what intruder.scale_sweep
    writes: one point per model row; without evaluations, points without metrics and no
    axes); anything else raises one ReportError naming `source`."""
    protocols: dict[str, str] = {}
    points: list[ScalePoint] = []
    for row in _rows(doc, source):
        ms: dict[str, float] = {}  # the first finite value of each metric (null: not finite)
        for e in row["results"]:
            name = f"{e['evaluator']}/{e['metric']}"
            if e["value"] is not None and name not in ms:
                ms[name] = float(e["value"])
                protocols.setdefault(name, f"{e['protocol']} [{e['unit']}] (n = {e['n_units']})")
        points.append(ScalePoint(_label(row), row["role"], row["alpha"], tuple(ms.items()),
                                 row["n_intruders"], row["note"]))
    metrics: list[str] = []  # first-seen order
    for p in points:
        for name, _ in p.metrics:
            if name not in metrics:
                metrics.append(name)
    kx, ky = choose_axes(_key(m) for m in metrics)
    return ScaleTable(source, tuple(points), tuple(metrics), "/".join(kx) if kx else None,
                      "/".join(ky) if ky else None, tuple(protocols.items()),
                      _num(doc.get("epsilon")), doc["intervention"])


def load_scale_results(path: str) -> ScaleTable:
    """Read a scale-results.json that `intruder scale ... --eval` wrote."""
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no scale results there (run `intruder scale ... --eval` first)")
    return parse_scale_results(read_json(path, ReportError, "scale results", max_bytes=None), path)
