"""`intruder track BASE STEP...` and `intruder compare BASE FT...`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..io.atomic import write_text
from ..io.targets import Target, check_targets
from . import cli
from .common import echo_err, emit, handle_errors, terminal_safe
from .hubopts import offline_option, report_base_check, strict_base_option
from .options import command_line, fail_options, pop_scan_config, quiet_option, scan_options

F = TypeVar("F", bound=Callable[..., Any])


def _common(fn: F) -> F:
    """The scan settings, then what track and compare print and when they fail."""
    for o in reversed([
        scan_options,
        click.option("--json", "as_json", is_flag=True, help="Print the JSON document to stdout."),
        click.option("--html", type=click.Path(dir_okay=False), default=None,
                     help="Also write a self-contained HTML page (tables and plots)."),
        fail_options,
        quiet_option,
    ]):
        fn = o(fn)
    return fn


@cli.command("track")
@click.argument("base", type=click.Path(readable=False))
@click.argument("steps", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("-o", "--output", default="intruder-track.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the JSON document.")
@_common
@strict_base_option
@offline_option
def track_command(base: str, steps: tuple[str, ...], output: str, **kw: Any) -> None:
    """Follow intruders along sequential fine-tunes (continual learning).

    Each STEP is measured against BASE and against the step before it; intruders are followed
    from step to step (persistent / new / gone). A PEFT adapter as a STEP is applied to the
    previous step's weights.

    \b
    Examples:
      intruder track base/ step1/ step2/ step3/
      intruder track base/ step1/ step2/ --epsilon 0.5,0.7,0.9 --html track.html

    Exit codes: 0 done, 1 error, 3 intruders (--fail-on-intruders), 4 inside the margin
    (--fail-on-margin / --fail-on-strength).
    """
    _run("track", base, steps, output, **kw)


@cli.command("compare")
@click.argument("base", type=click.Path(readable=False))
@click.argument("finetunes", nargs=-1, required=True, type=click.Path(readable=False))
@click.option("-o", "--output", default="intruder-compare.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the JSON document.")
@_common
@strict_base_option
@offline_option
def compare_command(base: str, finetunes: tuple[str, ...], output: str, **kw: Any) -> None:
    """Compare many fine-tunes of one base side by side, with a provenance verdict each.

    The base is decomposed once. Each FT may be a model (file or directory) or a PEFT adapter
    (applied to BASE). The verdict says whether the update looks LoRA-like (low rank, with the
    estimated rank) or full-fine-tuning-like, which modules changed, and a confidence.

    \b
    Examples:
      intruder compare base/ ft-a/ ft-b/ adapter-c/
      intruder compare base/ lora-r8/ full/ --json > compare.json

    Exit codes: 0 done, 1 error, 3 intruders (--fail-on-intruders), 4 inside the margin
    (--fail-on-margin / --fail-on-strength).
    """
    _run("compare", base, finetunes, output, **kw)


@handle_errors
def _run(mode: str, base: str, paths: tuple[str, ...], output: str, as_json: bool,
         html: str | None, fail_on_intruders: bool, fail_on_margin: float | None,
         fail_on_strength: float | None, quiet: bool, strict_base: bool = False,
         **scan_kw: Any) -> None:
    from ..report.track_table import track_table  # lazy: pulls torch
    from ..report.track_view import write_track_html  # lazy: pulls torch
    from ..run.multi import is_primary  # lazy: pulls torch
    from ..spectral.margin import fail_code  # lazy: pulls torch
    from ..track import dumps, run_compare, run_track  # lazy: pulls torch

    config = pop_scan_config(scan_kw)
    inputs = [base, *paths]
    check_targets([Target(output, "-o"), *([Target(html, "--html")] if html else [])], inputs)
    runner = run_track if mode == "track" else run_compare
    tr = runner(base, list(paths), config, progress=not quiet and not as_json,
                command=command_line(), strict_base=strict_base)
    if not is_primary():  # torchrun: rank 0 writes and prints the document
        return
    for e in tr.entries:
        report_base_check(e.vs_base.tuned, quiet)
    text = dumps(tr)
    write_text(output, text + "\n")
    if html:
        write_track_html(tr, html)
    if as_json:
        emit(text)
    else:
        emit(terminal_safe(track_table(tr)))
        echo_err(f"{mode} written to {output}", quiet)
    if html:
        echo_err(f"HTML page written to {html}", quiet)
    code = fail_code([e.vs_base for e in tr.entries], fail_on_intruders, fail_on_margin,
                     fail_on_strength)
    if code:
        sys.exit(code)
