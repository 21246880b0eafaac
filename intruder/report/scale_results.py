"""The scale-results file (`intruder scale ... --eval`): its declaration, and its reader.

Declared once here and used by both sides: the file names, the FORMAT tag, the fields of one
evaluator result (`result_entry`, what intruder.scale_sweep writes for every model row), and the
ONE metric preference (`choose_axes`) that picks the trade-off plot's axes, so the PNG the sweep
writes and the HTML audit's plot show the same two metrics.

A file carrying FORMAT is read by that declaration. Older or hand-made files are read tolerantly:
it accepts the rows either as a list or under `rows`,
`results`, `alphas`, `runs` or `points`; each row's metrics either as a list of evaluator results
({evaluator, metric, value, protocol, ...}) under `evals`/`eval`/`metrics`/`results`, as a
{metric: value} mapping, or as flat numeric fields; base and tuned references either as rows
whose `role`/`label`/`name` says so, rows with alpha = 1 (tuned), or under `base`/`tuned`/
`references`. Anything it cannot read is reported as a ReportError naming the file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ReportError
from ..io.jsonfile import read_json

FORMAT = "intruder.scale-results/1"
RESULTS_JSON = "scale-results.json"
RESULTS_CSV = "scale-results.csv"
PLOT_PNG = "scale-tradeoff.png"
RESULT_FIELDS = ("evaluator", "metric", "value", "n_units", "unit", "protocol", "extra")
ROW_FIELDS = ("label", "role", "alpha", "path", "n_intruders", "n_matrices", "max_rel_change",
              "note", "results")

_ROW_KEYS = ("rows", "results", "alphas", "runs", "points", "models")
_METRIC_KEYS = ("evals", "eval", "evaluations", "metrics", "results", "scores")
_SKIP = {"alpha", "index", "n_units", "seconds", "n_layers", "n_intruders", "layers_rescaled",
         "intruders_rescaled", "step"}
_PRETRAIN = re.compile(r"wikitext|perplex|ppl|bits_per_byte|bpb|pretrain|forget", re.I)
_TASK = re.compile(r"acc|task|winogrande|siqa|social|score|f1|exact", re.I)
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


@dataclass(frozen=True)
class ScalePoint:
    label: str  # 'base', 'tuned', 'alpha=0.5'
    role: str  # base | tuned | alpha
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
    epsilon: float | None = None  # threshold whose intruders were rescaled, when recorded
    intervention: str = ""  # the formula, when recorded


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _metrics(row: dict[str, Any], protocols: dict[str, str]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for key in _METRIC_KEYS:
        sub = row.get(key)
        if isinstance(sub, list):
            for e in sub:
                if isinstance(e, dict) and "metric" in e and (ev := _num(e.get("value"))) is not None:
                    name = f"{e['evaluator']}/{e['metric']}" if e.get("evaluator") else str(e["metric"])
                    out.append((name, ev))
                    if isinstance(e.get("protocol"), str):
                        unit = f" [{e['unit']}]" if isinstance(e.get("unit"), str) else ""
                        n = f" (n = {e['n_units']})" if _num(e.get("n_units")) is not None else ""
                        protocols.setdefault(name, e["protocol"] + unit + n)
        elif isinstance(sub, dict):
            for name, v in sub.items():
                if (nv := _num(v)) is not None:
                    out.append((str(name), nv))
                elif isinstance(v, dict):  # {evaluator: {metric: value}}
                    for m, mv in v.items():
                        if (nmv := _num(mv)) is not None:
                            out.append((f"{name}/{m}", nmv))
    if not out:
        for name, v in row.items():
            if name not in _SKIP and (nv := _num(v)) is not None:
                out.append((str(name), nv))
    seen: set[str] = set()
    first: list[tuple[str, float]] = []  # the first value of each name
    for n, v in out:
        if n not in seen:
            seen.add(n)
            first.append((n, v))
    return first


def _role(row: dict[str, Any], hint: str | None) -> tuple[str, float | None]:
    alpha = _num(row.get("alpha"))
    tag = " ".join(str(row.get(k, "")) for k in ("role", "label", "name", "model", "kind")).lower()
    if hint:
        return hint, alpha
    if re.search(r"\bbase\b", tag):
        return "base", alpha
    if re.search(r"\btuned\b", tag):
        return "tuned", alpha if alpha is not None else 1.0
    return "alpha", alpha  # 'scaled' rows and anything else with an alpha


def parse_scale_results(doc: Any, source: str = "scale results") -> ScaleTable:
    """Build a ScaleTable from already-parsed JSON data."""
    rows: list[tuple[dict[str, Any], str | None]] = []
    if isinstance(doc, list):
        rows = [(r, None) for r in doc]
    elif isinstance(doc, dict):
        for key in _ROW_KEYS:
            if isinstance(doc.get(key), list) and any(isinstance(r, dict) for r in doc[key]):
                rows = [(r, None) for r in doc[key]]
                break
        given = doc.get("references")
        refs: dict[Any, Any] = given if isinstance(given, dict) else doc
        for role in ("base", "tuned"):
            if isinstance(refs.get(role), dict) and (
                    any(k in refs[role] for k in _METRIC_KEYS) or "alpha" in refs[role]):
                rows.insert(0 if role == "base" else len(rows), (refs[role], role))
    else:
        raise ReportError(f"{source}: expected a JSON object or list of rows")
    protocols: dict[str, str] = {}
    points: list[ScalePoint] = []
    for row, hint in rows:
        if not isinstance(row, dict):
            continue
        role, alpha = _role(row, hint)
        ms = _metrics(row, protocols)
        if not ms:
            continue
        label = "base" if role == "base" else ("tuned (alpha = 1)" if role == "tuned"
                                                 else f"alpha = {alpha:g}" if alpha is not None
                                                 else str(row.get("label") or row.get("name") or "?"))
        n_i = row.get("n_intruders", row.get("intruders"))
        points.append(ScalePoint(label, role, alpha, tuple(ms),
                                 int(n_i) if n_i is not None and _num(n_i) is not None else None,
                                 str(row.get("note") or "")))
    if not points:
        raise ReportError(f"{source}: no rows with numeric metrics found (expected a list of "
                          f"{{alpha, evals: [{{evaluator, metric, value}}]}} rows)")
    if not any(p.role == "tuned" for p in points):  # alpha = 1 is the tuned model itself
        points = [replace(p, label="tuned (alpha = 1)", role="tuned")
                  if p.role == "alpha" and p.alpha == 1.0 else p for p in points]
    metrics: list[str] = []
    for p in points:
        for n, _ in p.metrics:
            if n not in metrics:
                metrics.append(n)

    def split_metric(m: str) -> tuple[str, str]:
        ev, _, leaf = m.rpartition("/")
        return (ev, leaf)

    kx, ky = choose_axes([split_metric(m) for m in metrics])
    x = f"{kx[0]}/{kx[1]}" if kx and kx[0] else (kx[1] if kx else None)
    y = f"{ky[0]}/{ky[1]}" if ky and ky[0] else (ky[1] if ky else None)
    declared = isinstance(doc, dict) and doc.get("format") == FORMAT
    if not declared:  # hand-made files: guess the roles from the names
        x = x or next((m for m in metrics if _PRETRAIN.search(m)
                       and not is_task_evaluator(m)), None)
        y = y or next((m for m in metrics if m != x and _TASK.search(m)), None)
        rest = [m for m in metrics if m not in (x, y)]
        x = x or (rest.pop(0) if rest else None)
        y = y or (rest.pop(0) if rest else None)
    eps = _num(doc.get("epsilon")) if isinstance(doc, dict) else None
    formula = doc.get("intervention") if isinstance(doc, dict) else None
    return ScaleTable(source, tuple(points), tuple(metrics), x, y, tuple(protocols.items()), eps,
                      formula if isinstance(formula, str) else "")


def load_scale_results(path: str) -> ScaleTable:
    """Read scale-results.json (see the module docstring for the accepted shapes)."""
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no scale results there (run `intruder scale ... --eval` first)")
    return parse_scale_results(read_json(path, ReportError, "scale results", max_bytes=None), path)
