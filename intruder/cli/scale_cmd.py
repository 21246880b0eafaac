"""`intruder scale`: rescale intruder dimensions by alpha, write the models, optionally evaluate."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from ..errors import OutputError
from ..evaluate import check_evaluators, get_evaluator
from ..io.targets import CONTAINER, DIR, FILE, Target, check_targets, create_dir, remove_dirs
from ..types import ScanConfig, ScanReport
from . import cli
from .common import echo_err, emit, float_list, handle_errors, terminal_safe
from .hubopts import offline_option, report_base_check, strict_base_option
from .options import command_line, pop_scan_config, quiet_option, scan_options

if TYPE_CHECKING:  # the sweep imports torch: not at CLI start-up
    from ..scale_sweep import Sweep

_SCAN_ONLY = ("top_k", "vectors", "include", "exclude", "cache_dir", "no_cache", "allow_nonfinite")
SCAN_JSON = "intruder-scan.json"  # the scan report `scale BASE TUNED` saves under -o


@cli.command("scale")
@click.argument("paths", nargs=-1, metavar="[BASE TUNED]", type=click.Path(readable=False))
@click.option("--alpha", required=True, metavar="A[,A...]",
              help="Factor for the intruders' singular values: 0 removes them, 1 keeps the tuned "
                   "model; a comma list writes one model per value.")
@click.option("--scan", "scan_path", default="intruder-scan.json", show_default=True,
              type=click.Path(dir_okay=False, readable=False),
              help="Scan report to take paths, intruders and settings from (without BASE TUNED).")
@click.option("-o", "--output", "out_dir", default="intruder-scale", show_default=True,
              type=click.Path(file_okay=False),
              help="Output directory: alpha-A/ (or alpha-A.safetensors) per alpha, results files.")
@click.option("--eval", "evals", multiple=True, metavar="SPEC",
              help="Evaluate base, tuned and every alpha (in memory): wikitext[:PATH], "
                   "wikitext-sliding[:PATH] (adds the 8x dearer stride-512 token perplexity), "
                   "task:PATH, lm-eval:TASK[,TASK...]. Repeatable.")
@click.option("--save-alpha", "save_alpha", multiple=True, metavar="A[,A...]",
              help="With --eval: also write the model of these alphas (repeatable; 'all' for "
                   "every alpha). Without --eval every alpha is written.")
@click.option("--lm-eval-include", "lm_eval_include", multiple=True,
              type=click.Path(exists=True), metavar="DIR",
              help="Folder (or YAML file) of lm-eval task configs for --eval lm-eval:TASK.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Evaluation workers, one model copy each, alphas split between them "
                   "(default: one per visible GPU; 1 on the CPU).")
@click.option("--shard/--no-shard", default=None,
              help="Spread one model over every visible GPU (device_map=auto) instead of one "
                   "copy per GPU (default: only when the model does not fit on one GPU).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N documents / items / lines of each evaluator.")
@click.option("--model-config", type=click.Path(exists=True, file_okay=False), default=None,
              help="Directory with config.json and tokenizer for bare .safetensors models "
                   "(default: BASE when it is such a directory).")
@scan_options(notes={
    "top_k": "With BASE TUNED only (a scan setting).",
    "epsilon": "With a scan report: select the report's top-k vectors below one EPS (default: "
               "the report's own); with BASE TUNED: the scan's.",
    "vectors": "With BASE TUNED only (a scan setting).",
    "include": "With BASE TUNED only (a scan setting).",
    "exclude": "With BASE TUNED only (a scan setting).",
    "device": "Decompositions and evaluation.",
    "cache_dir": "With BASE TUNED only (a scan setting).",
    "no_cache": "With BASE TUNED only (a scan setting).",
    "allow_nonfinite": "With BASE TUNED only (a scan setting).",
})
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              default="auto", show_default=True, help="Evaluation dtype (auto: float32 on CPU).")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Evaluation tokens per window (default: the model's context length).")
@click.option("--force", is_flag=True, help="Replace existing alpha outputs under -o.")
@click.option("--json", "as_json", is_flag=True, help="Print scale-results.json to stdout.")
@click.option("--html", type=click.Path(dir_okay=False), default=None,
              help="Also write the HTML audit of the scan with the trade-off section.")
@quiet_option
@strict_base_option
@offline_option
@click.pass_context
@handle_errors
def scale_command(ctx: click.Context, paths: tuple[str, ...], alpha: str, scan_path: str,
                  out_dir: str, evals: tuple[str, ...], save_alpha: tuple[str, ...],
                  lm_eval_include: tuple[str, ...], workers: int | None, shard: bool | None,
                  limit: int | None, model_config: str | None, dtype: str,
                  max_length: int | None, force: bool, as_json: bool, html: str | None,
                  quiet: bool, strict_base: bool, **scan_kw: Any) -> None:
    """Rescale intruder dimensions: W' = Wt + (alpha - 1) * sum_j sigma_j u_j v_j^T.

    Without BASE TUNED the intruders, paths and settings come from the scan report
    (./intruder-scan.json, or --scan FILE); with BASE TUNED a scan runs first and its report is
    saved under -o. Each output mirrors TUNED: a .safetensors file gives a file, a model
    directory a directory (config, tokenizer and index included), a PEFT adapter a merged model
    directory. alpha = 1 reproduces TUNED bit for bit.

    With --eval, base, tuned and every alpha are evaluated: the tuned model is loaded once per
    GPU and rescaled in place for each alpha (several GPUs: alphas in parallel; torchrun works
    the same way), and only the --save-alpha models are written. The table,
    scale-results.json, scale-results.csv and scale-tradeoff.png (pre-training metric against
    task metric) record the trade-off. Every evaluator's data is read before any model work.

    \b
    Examples:
      intruder scale --alpha 0.5 --eval wikitext
      intruder scale base/ tuned/ --alpha 0,0.25,0.5,0.75,1 --eval wikitext \\
          --eval task:siqa.json -o out/
      intruder scale --alpha 0,0.5,1 --eval wikitext --eval lm-eval:arc_easy \\
          --save-alpha 0.5
      intruder scale --alpha 0 --epsilon 0.7 -o removed/
    """
    from ..intervene import refuse_overflowing_alphas, resolve_inputs  # lazy: pulls torch
    from ..report.html import write_html  # lazy: pulls torch
    from ..report.schema import load_report, save_report  # lazy: pulls torch
    from ..scale_sweep import format_sweep, to_dict  # lazy: pulls torch

    if len(paths) not in (0, 2):
        raise click.UsageError("give both BASE and TUNED, or neither (to use the scan report)")
    alphas = tuple(dict.fromkeys(float_list(alpha, "--alpha")))  # unique, in the given order
    saves = _save_alphas(save_alpha, alphas)
    if saves is not None and not evals:
        raise click.UsageError("--save-alpha chooses what to keep of an evaluated sweep; without "
                               "--eval every alpha is written")
    if evals:  # an unknown evaluator, missing task file or data fails before any scan or write
        opts = {"lm_eval_include": lm_eval_include} if lm_eval_include else {}
        check_evaluators([get_evaluator(spec, **opts) for spec in evals], limit)
    log = (lambda m: None) if quiet else (lambda m: echo_err(m))
    epsilon = scan_kw["epsilon"] if _given(ctx, "epsilon") else None
    kw = dict(evals=evals, limit=limit, model_config=model_config, device=scan_kw["device"],
              dtype=None if dtype == "auto" else dtype, max_length=max_length, force=force,
              progress=not quiet, log=log, save_alphas=saves, lm_eval_include=lm_eval_include,
              workers=workers, shard=shard)
    written = alphas if not evals else tuple(dict.fromkeys(saves or ()))  # models written
    if paths:
        if _given(ctx, "scan_path"):
            raise click.UsageError("--scan reads an existing report; with BASE TUNED a new scan "
                                   "runs, so give one or the other")
        config = pop_scan_config(scan_kw)
        _check_scale_targets(out_dir, written, paths[0], paths[1], None, html, force)
        made = create_dir(out_dir)
        try:
            report, report_path = _scan_first(paths, out_dir, config, quiet, log, strict_base)
            report_base_check(report.tuned, quiet)
            base, tuned = report.base.path, report.tuned.path  # a hub ID -> its local snapshot
            refuse_overflowing_alphas(report, alphas)
            sweep = _sweep(report, alphas, out_dir, report_path, base, tuned, None, kw)
            # the new report replaces the previous one only now, everything else done
            if sweep is not None:
                save_report(report, report_path)
        except BaseException:  # a bad input or Ctrl-C leaves no empty output directory behind
            remove_dirs(made)
            raise
    else:
        given = [o for o in _SCAN_ONLY if _given(ctx, o)]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} is a scan setting: give BASE "
                                   f"and TUNED to scan again, or rescan with `intruder scan`")
        report, report_path = load_report(scan_path), scan_path
        eps_override = None
        if epsilon is not None:
            eps = float_list(epsilon, "--epsilon")
            if len(eps) != 1:
                raise click.BadParameter("with a scan report --epsilon takes one value",
                                         param_hint="--epsilon")
            eps_override = eps[0]
        refuse_overflowing_alphas(report, alphas, eps_override)
        base, tuned = resolve_inputs(report, report_path)
        _check_scale_targets(out_dir, written, base, tuned, report_path, html, force)
        made = create_dir(out_dir)
        try:
            sweep = _sweep(report, alphas, out_dir, report_path, None, None, eps_override, kw)
        except BaseException:
            remove_dirs(made)
            raise
    if sweep is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if html:
        write_html(report, html, scale_results=sweep.files["json"], command=command_line())
    if as_json:
        emit(json.dumps(to_dict(sweep), indent=1, allow_nan=False))
    else:
        emit(terminal_safe(format_sweep(sweep)))
    for what, path in sweep.files.items():
        log(f"{what} written to {path}")
    if html:
        log(f"HTML audit written to {html}")


def _save_alphas(values: tuple[str, ...],
                 alphas: tuple[float, ...]) -> tuple[float, ...] | None:
    """--save-alpha values: None when not given, every alpha for 'all'."""
    if not values:
        return None
    out: list[float] = []
    for v in values:
        if v.strip().lower() == "all":
            out.extend(alphas)
        else:
            out.extend(float_list(v, "--save-alpha"))
    return tuple(out)


def _check_scale_targets(out_dir: str, alphas: Sequence[float], base: str | None, tuned: str,
                         report_path: str | None, html: str | None, force: bool) -> None:
    """Every path this run writes, checked together before any scan or write."""
    from ..scale_sweep import PLOT_PNG, RESULTS_CSV, RESULTS_JSON, output_path  # lazy: pulls torch

    targets = [Target(out_dir, "-o", CONTAINER, make_parents=True)]
    for a in alphas:
        p = output_path(out_dir, a, tuned)
        targets.append(Target(p, f"the alpha={a:g} output", FILE if p.endswith(".safetensors")
                              else DIR, make_parents=True))
        if os.path.lexists(p) and not force:
            raise OutputError(f"{p}: already exists (use --force to replace it)")
    for name in (RESULTS_JSON, RESULTS_CSV, PLOT_PNG) + (() if report_path else (SCAN_JSON,)):
        targets.append(Target(os.path.join(out_dir, name), name, make_parents=True))
    if html:
        targets.append(Target(html, "--html"))
    check_targets(targets, [base, tuned, report_path])


def _sweep(report: ScanReport, alphas: Sequence[float], out_dir: str, report_path: str,
           base: str | None, tuned: str | None, epsilon: float | None,
           kw: dict[str, Any]) -> Sweep | None:
    from ..scale_sweep import run_sweep  # lazy: pulls torch

    return run_sweep(report, alphas, out_dir, report_path=report_path, base=base, tuned=tuned,
                     epsilon=epsilon, scan_report=report_path, **kw)


def _given(ctx: click.Context, name: str) -> bool:
    """Whether option `name` was given on the command line (or by an environment variable)."""
    src = ctx.get_parameter_source(name)
    return src is not None and src.name in ("COMMANDLINE", "ENVIRONMENT")


def _scan_first(paths: tuple[str, ...], out_dir: str, config: ScanConfig, quiet: bool,
                log: Callable[[str], None], strict_base: bool = False) -> tuple[ScanReport, str]:
    """Scan BASE TUNED; the report is kept in memory and saved once the sweep is done."""
    from ..scan import run_scan  # lazy: pulls torch

    base, tuned = paths
    report_path = os.path.join(out_dir, SCAN_JSON)
    log(f"scanning {tuned} against {base} ...")
    report = run_scan(base, tuned, config, progress=not quiet,
                      command=command_line(), strict_base=strict_base)
    n = sum(len(l.intruders) for l in report.layers)
    log(f"scan: {n} intruder(s) at epsilon {config.epsilon:g} in "
        f"{sum(1 for l in report.layers if l.intruders)} matrices")
    return report, report_path
