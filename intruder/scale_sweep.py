"""An alpha sweep: rescale the intruders for each alpha, evaluate base, tuned and every alpha,
write scale-results.json / .csv and the trade-off plot (the paper's causal experiment).

    sweep = run_sweep(report, [0, 0.5, 1], "out/", evals=["wikitext", "task:siqa.json"])
    print(format_sweep(sweep))

Without evaluations every alpha's model is written (`alpha-0.5/` for a directory or adapter
input, `alpha-0.5.safetensors` for a file input). With evaluations the tuned model is loaded
once per device and moved between alphas in place (intruder.inplace, intruder.sweep_exec):
nothing is written but `scale-results.json`, `scale-results.csv`, `scale-tradeoff.png` and the
alphas named in `save_alphas`. Every evaluator's data is found and read before any model work.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

from . import __version__
from .errors import IntruderError, OutputError
from .evaluate import check_evaluators, get_evaluator
from .evaluate.model import resolve_device
from .intervene import FORMULA, ScaleResult, resolve_inputs, scale_checkpoint, select_intruders
from .io import open_checkpoint
from .io.atomic import check_output, commit_staged, discard_staged, staging_path, write_text
from .io.pairing import _align
from .io.safetensors_file import DTYPES
from .report.plots_scale import SweepPoint, plot_metric_vs_alpha, plot_tradeoff
from .report.scale_results import (
    FORMAT,
    PLOT_PNG,
    RESULTS_CSV,
    RESULTS_JSON,
    ROWS,
    choose_axes,
    row_entry,
)
from .report.table import format_table
from .sweep_exec import (
    SweepSpec,
    distributed,
    make_jobs,
    peak_summary,
    run_jobs,
    run_jobs_torchrun,
)
from .types import EvalResult, ScanReport


@dataclass(frozen=True)
class ModelRow:
    """One model of the sweep and what the evaluators said about it."""

    label: str  # base | tuned | alpha=0.5
    role: str  # base | tuned | scaled
    alpha: float | None
    path: str  # where the model is ("" when it was evaluated in memory only)
    n_intruders: int | None = None  # directions rescaled (None for base / tuned)
    n_matrices: int | None = None
    max_rel_change: float | None = None  # max over matrices of ||W'-Wt||_F / ||Wt||_F
    results: tuple[EvalResult, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Sweep:
    """Everything a sweep produced."""

    base: str
    tuned: str
    tuned_kind: str
    out_dir: str
    alphas: tuple[float, ...]
    epsilon: float
    top_k: int
    scaled: tuple[ScaleResult, ...]  # the checkpoints written
    rows: tuple[ModelRow, ...]
    evals: tuple[str, ...] = ()
    limit: int | None = None
    files: dict[str, str] = field(default_factory=dict)
    scan_report: str = ""
    timing: dict[str, object] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


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
        raise OutputError(f"{out_dir}: cannot create ({exc.strerror})") from exc
    return out_dir


def run_sweep(report: ScanReport, alphas: Sequence[float], out_dir: str, *,
              report_path: str | None = None, base: str | None = None,
              tuned: str | None = None, epsilon: float | None = None,
              evals: Sequence[str] = (), limit: int | None = None,
              model_config: str | None = None, device: str = "auto",
              dtype: str | None = None, max_length: int | None = None,
              force: bool = False, progress: bool = False,
              log: Callable[[str], None] = lambda m: None, scan_report: str = "",
              save_alphas: Sequence[float] | None = None,
              lm_eval_include: Sequence[str] = (), workers: int | None = None,
              shard: bool | None = None) -> Sweep | None:
    """Evaluate base, tuned and every alpha (in memory) and record; write the models of
    `save_alphas` (every alpha when there is nothing to evaluate).

    workers: evaluation processes (default: one per visible GPU, one on the CPU); shard: spread
    one model over every GPU (default: when it does not fit on one). Under torchrun every rank
    calls this; rank 0 returns the Sweep, the others None.
    """
    t_start = time.perf_counter()
    alphas = tuple(dict.fromkeys(float(a) for a in alphas))  # unique, in the given order
    for a in alphas:
        if not math.isfinite(a):
            raise IntruderError(f"--alpha must be a finite number, got {a}")
    base_path, tuned_path = resolve_inputs(report, report_path, base, tuned)
    evals = tuple(evals)
    options = {"lm_eval_include": tuple(lm_eval_include)} if lm_eval_include else {}
    evaluators = _build_evaluators(evals, options)  # an unknown evaluator fails before any work
    if evaluators:  # every evaluator's data found and read before anything is rescaled
        for line in check_evaluators(evaluators, limit):
            log(f"data: {line}")
    if save_alphas is None:
        saves = () if evaluators else alphas
    else:
        saves = tuple(dict.fromkeys(float(a) for a in save_alphas))
        extra = [a for a in saves if a not in alphas]
        if extra:
            raise IntruderError(f"--save-alpha {alpha_name(extra[0])} is not one of the swept "
                                f"alphas ({', '.join(alpha_name(a) for a in alphas)})")
    rank, world, _ = distributed()
    prepare_out_dir(out_dir, [base_path, tuned_path])
    outputs = [output_path(out_dir, a, tuned_path) for a in saves]
    results_json = os.path.join(out_dir, RESULTS_JSON)
    for p in outputs + [results_json]:
        check_output(p, [base_path, tuned_path])
        if os.path.lexists(p) and not force and p != results_json and rank == 0:
            raise OutputError(f"{p}: already exists (use --force to replace it)")
    adapter = os.path.isfile(os.path.join(tuned_path, "adapter_config.json"))
    tmp_ref = None
    # every model is written under a staged name and renamed into place only when the whole
    # sweep has succeeded: a failing run leaves the previous outputs as they were
    staged = [staging_path(p) for p in outputs] if rank == 0 else list(outputs)
    write_alphas, write_outputs = list(saves), list(staged)
    if evaluators and adapter:
        # the model to load is the adapter merged into the base: written once, alpha = 1
        tmp_ref = tempfile.mkdtemp(prefix=".tuned-merged-", dir=out_dir)
        os.rmdir(tmp_ref)
        write_alphas.append(1.0)
        write_outputs.append(tmp_ref)
    scaled: list[ScaleResult] = []
    timing: dict[str, object] = {}
    try:
        if write_alphas and rank == 0:
            log(f"rescaling intruders ({FORMULA}) and writing alpha = "
                f"{', '.join(alpha_name(a) for a in write_alphas[:len(saves)]) or '1 (merged)'}")
            t0 = time.perf_counter()
            scaled = scale_checkpoint(report, write_alphas, write_outputs, report_path=report_path,
                                      base=base_path, tuned=tuned_path, epsilon=epsilon,
                                      device=None if device == "auto" else device,
                                      progress=progress)
            timing["write_seconds"] = time.perf_counter() - t0
            for r in scaled[: len(saves)]:
                log(f"  alpha {alpha_name(r.alpha)}: {r.n_intruders} intruder direction(s) in "
                    f"{len(r.layers)} matrices -> {r.path}")
        if world > 1 and tmp_ref is not None:
            tmp_ref = _share_from_rank0(tmp_ref)
        rows: list[ModelRow] = []
        warnings: list[str] = [w for r in scaled for w in r.warnings]
        if evaluators:
            model_path = tmp_ref or tuned_path
            spec = SweepSpec(report=report, base_path=base_path, model_path=model_path,
                             evals=evals, epsilon=epsilon, eval_options=tuple(options.items()),
                             model_config=_model_config(model_config, base_path), dtype=dtype,
                             max_length=max_length, limit=limit,
                             storage_dtypes=_storage_dtypes(report, model_path, epsilon),
                             adapter_path=tuned_path if adapter else None)
            jobs = make_jobs(sorted(set(alphas) | {1.0}))
            if world > 1:
                spec = SweepSpec(**{**spec.__dict__, "shard": False})
                run = run_jobs_torchrun(spec, jobs, _torchrun_device(device), log)
                if run is None:
                    return None
                devices = [f"{world} torchrun ranks"]
            else:
                devices, sharded = plan_devices(device, workers, shard, model_path)
                spec = SweepSpec(**{**spec.__dict__, "shard": sharded})
                log(f"evaluating {len(jobs)} models on {', '.join(devices)}"
                    f"{' (one model sharded over every GPU)' if sharded else ''}")
                run = run_jobs(spec, jobs, devices, log, progress)
            rows, more = _rows(run.results, alphas, base_path, tuned_path, adapter, scaled)
            warnings += more
            timing.update(_timing(run, devices))
        if rank == 0 and staged:
            commit_staged(zip(staged, outputs))
            final = dict(zip(staged, outputs))
            scaled = [dataclasses.replace(r, path=final.get(r.path, r.path)) for r in scaled]
            rows = [dataclasses.replace(r, path=final.get(r.path, r.path)) for r in rows]
            staged = []
    finally:
        if tmp_ref is not None and rank == 0:
            shutil.rmtree(tmp_ref, ignore_errors=True)
        if rank == 0:
            discard_staged(staged)
    if not rows:
        rows = [_row_for(r) for r in scaled[: len(saves)]]
    timing["wall_seconds"] = time.perf_counter() - t_start
    sweep = Sweep(base=base_path, tuned=tuned_path,
                  tuned_kind="adapter" if adapter else ("file" if os.path.isfile(tuned_path)
                                                        else "dir"),
                  out_dir=out_dir, alphas=alphas,
                  epsilon=float(epsilon if epsilon is not None else report.config.epsilon),
                  top_k=report.config.top_k, scaled=tuple(scaled[: len(saves)]),
                  rows=tuple(rows), evals=evals, limit=limit, scan_report=scan_report,
                  timing=timing, warnings=tuple(dict.fromkeys(warnings)))
    return write_results(sweep)


def _build_evaluators(evals: Sequence[str], options: dict | None = None):
    if not evals:
        return []
    return [get_evaluator(s, **(options or {})) for s in evals]


def _model_config(model_config: str | None, base_path: str) -> str | None:
    if model_config is None and os.path.isfile(os.path.join(base_path, "config.json")):
        return base_path  # config + tokenizer for bare .safetensors models
    return model_config


def _storage_dtypes(report: ScanReport, model_path: str, epsilon) -> tuple[tuple[str, str], ...]:
    """Report layer -> torch dtype name the checkpoint stores it in (what a written alpha
    checkpoint would hold), so a model evaluated in float32 sees the written weights."""
    ck = open_checkpoint(model_path, allow_adapter=False)
    layers = list(select_intruders(report, epsilon))
    mapping = _align(layers, list(ck.refs))
    return tuple((n, DTYPES[ck.refs[mapping[n]].dtype][1]) for n in layers if n in mapping)


def plan_devices(device: str, workers: int | None, shard: bool | None,
                 model_path: str) -> tuple[list[str], bool]:
    """(devices, sharded): one worker per visible GPU (or `workers` of them), one sharded model
    when it is larger than one GPU (or `shard`), `workers` CPU processes on the CPU."""
    import torch

    dev = resolve_device(device)
    if workers is not None and workers < 1:
        raise IntruderError(f"--workers must be at least 1, got {workers}")
    if dev == "cpu":
        if shard:
            raise IntruderError("--shard needs GPUs")
        return ["cpu"] * (workers or 1), False
    if dev.startswith("cuda:"):
        return [dev], False
    n = torch.cuda.device_count()
    if shard is None:
        shard = n > 1 and _model_bytes(model_path) > 0.75 * torch.cuda.mem_get_info(0)[1]
    if shard:
        return ["cuda"], True
    k = min(workers or n, n)
    return [f"cuda:{i}" for i in range(k)], False


def _model_bytes(path: str) -> int:
    ck = open_checkpoint(path, allow_adapter=False)
    return sum(math.prod(r.shape) * DTYPES[r.dtype][0] for r in ck.refs.values())


def _torchrun_device(device: str) -> str:
    import torch

    return "cpu" if device == "cpu" or not torch.cuda.is_available() else "cuda"


def _share_from_rank0(value):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    box = [value]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    return box[0]


def _row_for(r: ScaleResult, results=(), note: str = "") -> ModelRow:
    rel = max((l.rel_change for l in r.layers), default=0.0)
    if r.alpha == 1.0 and not note:
        note = "the identity: the tuned weights, bit for bit"
    return ModelRow(label=f"alpha={alpha_name(r.alpha)}", role="scaled", alpha=r.alpha,
                    path=r.path, n_intruders=r.n_intruders, n_matrices=len(r.layers),
                    max_rel_change=rel, results=tuple(results), note=note)


def _rows(results, alphas, base_path, tuned_path, adapter, scaled):
    """Model rows from the job results: base, tuned (alpha = 1 in memory), each alpha."""
    by_alpha = {r.job.alpha: r for r in results if r.job.kind == "alpha"}
    saved = {r.alpha: r.path for r in scaled}
    base = next(r for r in results if r.job.kind == "base")
    tuned = by_alpha[1.0]
    rows = [ModelRow("base", "base", None, base_path, results=base.results),
            ModelRow("tuned", "tuned", 1.0, tuned_path, results=tuned.results,
                     note="adapter merged into base (the alpha = 1 model)" if adapter else "")]
    warnings: list[str] = []
    for a in sorted(alphas):
        r = by_alpha[a]
        warnings.extend(r.warnings)
        n_i = sum(len(c.indices) for c in r.changes)
        rel = max((c.rel_change for c in r.changes), default=0.0)
        if a == 1.0:
            note = "same weights as tuned; results of the tuned row"
        elif a in saved:
            note = ""
        else:
            note = "evaluated in memory; not saved (--save-alpha keeps a checkpoint)"
        rows.append(ModelRow(f"alpha={alpha_name(a)}", "scaled", a, saved.get(a, ""), n_i,
                             len(r.changes), rel, tuned.results if a == 1.0 else r.results,
                             note))
    return rows, warnings


def _timing(run, devices) -> dict[str, object]:
    """Seconds per job (model load, rescale, one evaluation pass) and peak memory per worker."""
    jobs = [{"job": "base" if r.job.kind == "base" else f"alpha={alpha_name(r.job.alpha)}",
             "worker": r.worker, "device": r.device, "load_seconds": r.load_seconds,
             "rescale_seconds": r.rescale_seconds, "eval_seconds": r.eval_seconds}
            for r in run.results]
    out: dict[str, object] = {"devices": list(devices), "jobs": jobs}
    out.update(peak_summary(run.stats))
    return out


# ------------------------------------------------------------------------------------ results


def _metric_keys(rows: Sequence[ModelRow]) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for row in rows:
        for r in row.results:
            if (r.evaluator, r.metric) not in keys:
                keys.append((r.evaluator, r.metric))
    return keys


def _first_result(rows: Sequence[ModelRow], key: tuple[str, str]) -> EvalResult:
    """The first row's result for a metric some row has (its protocol, unit and n)."""
    return next(r for r in (_result(row, key) for row in rows) if r is not None)


def _result(row: ModelRow, key: tuple[str, str]) -> EvalResult | None:
    for r in row.results:
        if (r.evaluator, r.metric) == key:
            return r
    return None


def to_dict(sweep: Sweep) -> dict:
    """The sweep as one JSON-ready document (scale-results.json)."""
    outputs = [{"alpha": r.alpha, "path": r.path, "kind": r.kind, "tensors": r.n_tensors,
                "bytes": r.bytes, "intruders": r.n_intruders,
                "layers": [{"name": l.name, "indices": list(l.indices), "sigma": list(l.sigma),
                            "rel_change": l.rel_change} for l in r.layers],
                "warnings": list(r.warnings)} for r in sweep.scaled]
    return {
        "format": FORMAT,
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "intervention": FORMULA + " over the intruders I of each matrix (float64, written in "
                                  "the tuned tensor's dtype)",
        "base": sweep.base, "tuned": sweep.tuned, "tuned_kind": sweep.tuned_kind,
        "scan_report": sweep.scan_report,
        "epsilon": sweep.epsilon, "top_k": sweep.top_k, "alphas": list(sweep.alphas),
        "evals": list(sweep.evals), "limit": sweep.limit,
        "outputs": outputs, ROWS: [row_entry(row) for row in sweep.rows], "files": dict(sweep.files),
        "timing": dict(sweep.timing), "warnings": list(sweep.warnings),
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
    return choose_axes(_metric_keys(rows))


def write_plot(sweep: Sweep, path: str) -> str | None:
    """The trade-off plot (pre-training metric vs task metric), or one metric against alpha."""
    pre, task = plot_choice(sweep.rows)
    if pre is None and task is None:
        return None
    proto = lambda key: _first_result(sweep.rows, key)  # noqa: E731
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
            ax = row.alpha if row.role == "scaled" and row.alpha is not None else float("nan")
            pts.append(SweepPoint(row.label, row.role, row.alpha, ax, r.value))
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
    keys = _metric_keys(sweep.rows)
    head = ["model", "alpha", "intruders scaled", "max ||W'-Wt||_F/||Wt||_F"]
    head += [f"{ev} {m}" for ev, m in keys]
    rows: list[Sequence[object]] = []
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
            r = _first_result(sweep.rows, key)
            lines.append(f"  {key[0]} {key[1]}: {r.protocol}; {r.unit}; n = {r.n_units}")
    notes = [f"  {row.label}: {row.note}" for row in sweep.rows if row.note]
    if notes:
        lines += ["", "notes:"] + notes
    lines += [f"WARNING: {w}" for w in sweep.warnings]
    if not any(r.n_intruders for r in sweep.rows if r.role == "scaled"):
        lines.append(f"WARNING: the scan found no intruders at epsilon {sweep.epsilon:g}; every "
                     f"output equals the tuned model (try --epsilon with a larger value)")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1e6 else f"{v:.4e}"
