"""An alpha sweep: rescale the intruders for each alpha, evaluate base, tuned and every output,
write scale-results.json / .csv and the trade-off plot (the paper's causal experiment).

    sweep = run_sweep(report, [0, 0.5, 1], "out/", evals=["wikitext", "task:siqa.json"])
    print(format_sweep(sweep))

Layout under the output directory: one model per alpha (`alpha-0.5/` for a directory or adapter
input, `alpha-0.5.safetensors` for a file input), `scale-results.json`, and with evaluations
`scale-results.csv` and `scale-tradeoff.png`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__
from .errors import OutputError
from .intervene import FORMULA, ScaleResult, resolve_inputs, scale_checkpoint
from .io.atomic import check_output, write_text
from .types import EvalResult, ScanReport

RESULTS_JSON = "scale-results.json"
RESULTS_CSV = "scale-results.csv"
PLOT_PNG = "scale-tradeoff.png"
PRETRAIN_METRICS = ("word_perplexity", "bits_per_byte", "byte_perplexity", "token_perplexity")
TASK_METRICS = ("accuracy", "acc_norm", "token_loss", "next_token_accuracy")


@dataclass(frozen=True)
class ModelRow:
    """One model of the sweep and what the evaluators said about it."""

    label: str  # base | tuned | alpha=0.5
    role: str  # base | tuned | scaled
    alpha: Optional[float]
    path: str
    n_intruders: Optional[int] = None  # directions rescaled (None for base / tuned)
    n_matrices: Optional[int] = None
    max_rel_change: Optional[float] = None  # max over matrices of ||W'-Wt||_F / ||Wt||_F
    results: Tuple[EvalResult, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Sweep:
    """Everything a sweep produced."""

    base: str
    tuned: str
    tuned_kind: str
    out_dir: str
    alphas: Tuple[float, ...]
    epsilon: float
    top_k: int
    scaled: Tuple[ScaleResult, ...]
    rows: Tuple[ModelRow, ...]
    evals: Tuple[str, ...] = ()
    limit: Optional[int] = None
    files: Dict[str, str] = field(default_factory=dict)
    scan_report: str = ""


def alpha_name(a: float) -> str:
    return format(float(a), "g")


def output_path(out_dir: str, alpha: float, tuned_path: str) -> str:
    """Where alpha's model goes: a .safetensors file for a file input, else a directory."""
    if os.path.isfile(tuned_path):
        return os.path.join(out_dir, f"alpha-{alpha_name(alpha)}.safetensors")
    return os.path.join(out_dir, f"alpha-{alpha_name(alpha)}")


def prepare_out_dir(out_dir: str, inputs: Sequence[str]) -> str:
    """Create the output directory (with parents), refusing one that is, or lies inside, an input."""
    real = os.path.realpath(os.path.abspath(out_dir))
    for inp in inputs:
        src = os.path.realpath(os.path.abspath(inp))
        if real == src or (os.path.isdir(src) and os.path.commonpath([src, real]) == src):
            raise OutputError(f"{out_dir}: output directory would be inside the input {inp}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"{out_dir}: exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create ({exc.strerror})")
    return out_dir


def run_sweep(report: ScanReport, alphas: Sequence[float], out_dir: str, *,
              report_path: Optional[str] = None, base: Optional[str] = None,
              tuned: Optional[str] = None, epsilon: Optional[float] = None,
              evals: Sequence[str] = (), limit: Optional[int] = None,
              model_config: Optional[str] = None, device: str = "auto",
              dtype: Optional[str] = None, max_length: Optional[int] = None,
              force: bool = False, progress: bool = False,
              log: Callable[[str], None] = lambda m: None, scan_report: str = "") -> Sweep:
    """Write one model per alpha under out_dir, then (with `evals`) evaluate and record."""
    alphas = tuple(dict.fromkeys(float(a) for a in alphas))  # unique, in the given order
    base_path, tuned_path = resolve_inputs(report, report_path, base, tuned)
    evaluators = _build_evaluators(evals)  # an unknown evaluator fails before any work
    prepare_out_dir(out_dir, [base_path, tuned_path])
    outputs = [output_path(out_dir, a, tuned_path) for a in alphas]
    results_json = os.path.join(out_dir, RESULTS_JSON)
    for p in outputs + [results_json]:
        check_output(p, [base_path, tuned_path])
        if os.path.lexists(p) and not force and p != results_json:
            raise OutputError(f"{p}: already exists (use --force to replace it)")
    adapter = os.path.isfile(os.path.join(tuned_path, "adapter_config.json"))
    tmp_ref = None
    write_alphas, write_outputs = list(alphas), list(outputs)
    if evaluators and adapter and 1.0 not in alphas:
        # the tuned reference of an adapter is the merged model: written in the same pass
        tmp_ref = tempfile.mkdtemp(prefix=".tuned-merged-", dir=out_dir)
        os.rmdir(tmp_ref)
        write_alphas.append(1.0)
        write_outputs.append(tmp_ref)
    log(f"rescaling intruders ({FORMULA}) for alpha = "
        f"{', '.join(alpha_name(a) for a in alphas)}")
    try:
        scaled = scale_checkpoint(report, write_alphas, write_outputs, report_path=report_path,
                                  base=base_path, tuned=tuned_path, epsilon=epsilon,
                                  device=None if device == "auto" else device, progress=progress)
        for r in scaled[: len(alphas)]:
            log(f"  alpha {alpha_name(r.alpha)}: {r.n_intruders} intruder direction(s) in "
                f"{len(r.layers)} matrices -> {r.path}")
        rows = []
        if evaluators:
            rows = _evaluate_all(evaluators, base_path, tuned_path, adapter, scaled, alphas,
                                 tmp_ref, model_config, device, dtype, max_length, limit,
                                 progress, log)
    finally:
        if tmp_ref is not None:
            shutil.rmtree(tmp_ref, ignore_errors=True)
    if not rows:
        rows = [_row_for(r) for r in scaled[: len(alphas)]]
    sweep = Sweep(base=base_path, tuned=tuned_path,
                  tuned_kind="adapter" if adapter else ("file" if os.path.isfile(tuned_path)
                                                        else "dir"),
                  out_dir=out_dir, alphas=alphas,
                  epsilon=float(epsilon if epsilon is not None else report.config.epsilon),
                  top_k=report.config.top_k, scaled=tuple(scaled[: len(alphas)]),
                  rows=tuple(rows), evals=tuple(evals), limit=limit, scan_report=scan_report)
    return write_results(sweep)


def _build_evaluators(evals: Sequence[str]):
    if not evals:
        return []
    from .evaluate import get_evaluator

    return [get_evaluator(s) for s in evals]


def _row_for(r: ScaleResult, results=(), note: str = "") -> ModelRow:
    rel = max((l.rel_change for l in r.layers), default=0.0)
    if r.alpha == 1.0 and not note:
        note = "the identity: the tuned weights, bit for bit"
    return ModelRow(label=f"alpha={alpha_name(r.alpha)}", role="scaled", alpha=r.alpha,
                    path=r.path, n_intruders=r.n_intruders, n_matrices=len(r.layers),
                    max_rel_change=rel, results=tuple(results), note=note)


def _evaluate_all(evaluators, base_path, tuned_path, adapter, scaled, alphas, tmp_ref,
                  model_config, device, dtype, max_length, limit, progress, log) -> List[ModelRow]:
    from .evaluate import evaluate_model

    if model_config is None and os.path.isfile(os.path.join(base_path, "config.json")):
        model_config = base_path  # config + tokenizer for bare .safetensors outputs

    def run(label, path):
        log(f"evaluating {label}: {path}")
        return tuple(evaluate_model(path, evaluators, model_config=model_config, device=device,
                                    dtype=dtype, max_length=max_length, limit=limit,
                                    progress=progress))

    rows = [ModelRow("base", "base", None, base_path, results=run("base", base_path))]
    by_alpha = {r.alpha: r for r in scaled}
    if adapter:
        ref = by_alpha[1.0]
        tuned_res = run("tuned (adapter merged, alpha = 1)", ref.path)
        rows.append(ModelRow("tuned", "tuned", 1.0, tuned_path, results=tuned_res,
                             note="adapter merged into base (the alpha = 1 model)"))
    else:
        tuned_res = run("tuned", tuned_path)
        rows.append(ModelRow("tuned", "tuned", 1.0, tuned_path, results=tuned_res))
    for a in sorted(alphas):
        r = by_alpha[a]
        if a == 1.0:  # bit-identical to the tuned weights: the same numbers
            rows.append(_row_for(r, tuned_res, "same weights as tuned; results of the tuned row"))
        else:
            rows.append(_row_for(r, run(f"alpha = {alpha_name(a)}", r.path)))
    return rows


# ------------------------------------------------------------------------------------ results


def _metric_keys(rows: Sequence[ModelRow]) -> List[Tuple[str, str]]:
    keys: List[Tuple[str, str]] = []
    for row in rows:
        for r in row.results:
            if (r.evaluator, r.metric) not in keys:
                keys.append((r.evaluator, r.metric))
    return keys


def _result(row: ModelRow, key: Tuple[str, str]) -> Optional[EvalResult]:
    for r in row.results:
        if (r.evaluator, r.metric) == key:
            return r
    return None


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def to_dict(sweep: Sweep) -> dict:
    """The sweep as one JSON-ready document (scale-results.json)."""
    rows = []
    for row in sweep.rows:
        d = {k: v for k, v in asdict(row).items() if k != "results"}
        d["results"] = [dict(evaluator=r.evaluator, metric=r.metric, value=_finite(r.value),
                             n_units=r.n_units, unit=r.unit, protocol=r.protocol,
                             extra={k: v for k, v in r.extra}) for r in row.results]
        rows.append(d)
    outputs = [{"alpha": r.alpha, "path": r.path, "kind": r.kind, "tensors": r.n_tensors,
                "bytes": r.bytes, "intruders": r.n_intruders,
                "layers": [{"name": l.name, "indices": list(l.indices), "sigma": list(l.sigma),
                            "rel_change": l.rel_change} for l in r.layers],
                "warnings": list(r.warnings)} for r in sweep.scaled]
    return {
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "intervention": FORMULA + " over the intruders I of each matrix (float64, written in "
                                  "the tuned tensor's dtype)",
        "base": sweep.base, "tuned": sweep.tuned, "tuned_kind": sweep.tuned_kind,
        "scan_report": sweep.scan_report,
        "epsilon": sweep.epsilon, "top_k": sweep.top_k, "alphas": list(sweep.alphas),
        "evals": list(sweep.evals), "limit": sweep.limit,
        "outputs": outputs, "models": rows, "files": dict(sweep.files),
    }


def to_csv(sweep: Sweep) -> str:
    """One line per (model, metric): long format, protocol and unit on every line."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "role", "alpha", "path", "intruders_scaled", "evaluator", "metric",
                "value", "n_units", "unit", "protocol"])
    for row in sweep.rows:
        for r in row.results:
            w.writerow([row.label, row.role, "" if row.alpha is None else repr(row.alpha),
                        row.path, "" if row.n_intruders is None else row.n_intruders,
                        r.evaluator, r.metric, repr(r.value), r.n_units, r.unit, r.protocol])
    return buf.getvalue()


def plot_choice(rows: Sequence[ModelRow]):
    """(pre-training metric key, task metric key) the plot uses; either may be None."""
    keys = _metric_keys(rows)
    pre = next((k for m in PRETRAIN_METRICS for k in keys
                if k[1] == m and not k[0].startswith("task")), None)
    task = next((k for m in TASK_METRICS for k in keys if k[1] == m and k[0].startswith("task")),
                None)
    return pre, task


def write_plot(sweep: Sweep, path: str) -> Optional[str]:
    """The trade-off plot (pre-training metric vs task metric), or one metric against alpha."""
    from .report.plots_scale import SweepPoint, plot_metric_vs_alpha, plot_tradeoff

    pre, task = plot_choice(sweep.rows)
    if pre is None and task is None:
        return None
    proto = lambda key: next(_result(r, key) for r in sweep.rows if _result(r, key))  # noqa: E731
    if pre is not None and task is not None:
        pts = []
        for row in sweep.rows:
            x, y = _result(row, pre), _result(row, task)
            if x is not None and y is not None and row.label != "alpha=1":
                pts.append(SweepPoint(row.label, row.role, row.alpha, x.value, y.value))
        return plot_tradeoff(pts, _axis_label(proto(pre)), _axis_label(proto(task)),
                             "Intruder rescaling: pre-training metric vs task metric", path,
                             note=_note([("x", proto(pre)), ("y", proto(task))]))
    key = pre or task
    pts = []
    for row in sweep.rows:
        r = _result(row, key)
        if r is not None:
            pts.append(SweepPoint(row.label, row.role, row.alpha,
                                  row.alpha if row.role == "scaled" else float("nan"), r.value))
    return plot_metric_vs_alpha(pts, _axis_label(proto(key)),
                                f"Intruder rescaling: {key[0]} {key[1]} against alpha", path,
                                note=_note([("y", proto(key))]))


def _note(parts) -> str:
    """Footnote naming each axis's protocol (shortened to fit the figure)."""
    lines = []
    for axis, r in parts:
        text = f"{axis}: {r.protocol}"
        lines.append(text if len(text) <= 150 else text[:147] + "...")
    return "\n".join(lines)


def _axis_label(r: EvalResult) -> str:
    """'wikitext word_perplexity\n(perplexity per word; n = 2456 words)'."""
    unit = r.unit.split(";")[-1].split("(")[0].strip()
    noun = (r.unit.split(";")[0].split("(")[0].split() or [""])[0]
    return f"{r.evaluator} {r.metric}\n({unit}; n = {r.n_units} {noun})"


def write_results(sweep: Sweep) -> Sweep:
    """scale-results.json always; with evaluations also scale-results.csv and the plot."""
    files = {"json": os.path.join(sweep.out_dir, RESULTS_JSON)}
    if any(row.results for row in sweep.rows):
        files["csv"] = os.path.join(sweep.out_dir, RESULTS_CSV)
        write_text(files["csv"], to_csv(sweep))
        png = write_plot(sweep, os.path.join(sweep.out_dir, PLOT_PNG))
        if png:
            files["plot"] = png
    sweep = Sweep(**{**sweep.__dict__, "files": files})
    write_text(files["json"], json.dumps(to_dict(sweep), indent=1, allow_nan=False) + "\n")
    return sweep


def format_sweep(sweep: Sweep) -> str:
    """Terminal table: one row per model, one column per metric, protocols listed underneath."""
    from .report.table import format_table

    keys = _metric_keys(sweep.rows)
    head = ["model", "alpha", "intruders scaled", "max ||W'-Wt||_F/||Wt||_F"]
    head += [f"{ev} {m}" for ev, m in keys]
    rows = []
    for row in sweep.rows:
        cells = [row.label, "-" if row.alpha is None else alpha_name(row.alpha),
                 "-" if row.n_intruders is None else f"{row.n_intruders} in {row.n_matrices} matrices",
                 "-" if row.max_rel_change is None else f"{row.max_rel_change:.4f}"]
        for key in keys:
            r = _result(row, key)
            cells.append("-" if r is None else _fmt(r.value))
        rows.append(cells)
    lines = [f"intruder scale: {FORMULA}",
             f"  intruders: scan at epsilon {sweep.epsilon:g}, top-{sweep.top_k} tuned "
             f"singular vectors; base {sweep.base}; tuned {sweep.tuned}", ""]
    lines.append(format_table(head, rows, "lrrr" + "r" * len(keys)))
    if keys:
        lines.append("")
        lines.append("metrics (protocol; unit; n):")
        for key in keys:
            r = next(_result(row, key) for row in sweep.rows if _result(row, key))
            lines.append(f"  {key[0]} {key[1]}: {r.protocol}; {r.unit}; n = {r.n_units}")
    notes = [f"  {row.label}: {row.note}" for row in sweep.rows if row.note]
    if notes:
        lines += ["", "notes:"] + notes
    warns = sorted({w for r in sweep.scaled for w in r.warnings})
    lines += [f"WARNING: {w}" for w in warns]
    if not any(r.n_intruders for r in sweep.scaled):
        lines.append(f"WARNING: the scan found no intruders at epsilon {sweep.epsilon:g}; every "
                     f"output equals the tuned model (try --epsilon with a larger value)")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1e6 else f"{v:.4e}"
