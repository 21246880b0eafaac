"""`intruder track BASE STEP...` and `intruder compare BASE FT...`."""

from __future__ import annotations

import sys

import click

from .. import settings
from ..exitcodes import INTRUDERS as EXIT_INTRUDERS
from ..exitcodes import MARGIN as EXIT_MARGIN
from ..io.targets import Target, check_targets
from . import cli
from .common import FINITE_FLOAT, echo_err, emit, float_list, handle_errors, terminal_safe
from .hubopts import offline_option, report_base_check, strict_base_option


def _common(fn):
    opts = [
        click.option("--top-k", default=10, show_default=True, type=int,
                     help="How many top tuned singular vectors to test."),
        click.option("--epsilon", "epsilon", default="0.5,0.7,0.9", show_default=True,
                     help="Thresholds on max |cos|; the first decides the listed intruders."),
        click.option("--vectors", type=click.Choice(["left", "right", "both"]), default="left",
                     show_default=True, help="Which singular vectors to match (paper: left)."),
        click.option("--include", metavar="REGEX", help="Also scan tensors matching REGEX."),
        click.option("--exclude", metavar="REGEX", help="Do not scan tensors matching REGEX."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--cache-dir", metavar="DIR", default=None,
                     help="Base spectral cache directory (default $INTRUDER_CACHE_DIR)."),
        click.option("--no-cache", is_flag=True, help="Do not read or write the base spectral cache."),
        click.option("--json", "as_json", is_flag=True, help="Print the JSON document to stdout."),
        click.option("--html", type=click.Path(dir_okay=False), default=None,
                     help="Also write a self-contained HTML page (tables and plots)."),
        click.option("--fail-on-intruders", is_flag=True,
                     help=f"Exit {EXIT_INTRUDERS} when any checkpoint has an intruder (vs base)."),
        click.option("--fail-on-margin", type=FINITE_FLOAT, default=None, metavar="COS",
                     help=f"Exit {EXIT_MARGIN} when a matrix's lowest max|cos| lies within COS of "
                          f"epsilon (see `intruder scan --help`)."),
        click.option("--fail-on-strength", type=FINITE_FLOAT, default=None, metavar="X",
                     help=f"Exit {EXIT_MARGIN} when a matrix's novel strength reaches X."),
        click.option("--allow-nonfinite", is_flag=True, help="Skip layers with NaN/Inf."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or chatter on stderr."),
    ]
    for o in reversed(opts):
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
def track_command(base, steps, output, **kw):
    """Follow intruders along sequential fine-tunes (continual learning).

    Each STEP is measured against BASE and against the step before it; intruders are followed
    from step to step (persistent / new / gone). A PEFT adapter as a STEP is applied to the
    previous step's weights.

    \b
    Examples:
      intruder track base/ step1/ step2/ step3/
      intruder track base/ step1/ step2/ --epsilon 0.5,0.9 --html track.html

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
def compare_command(base, finetunes, output, **kw):
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
def _run(mode, base, paths, output, top_k, epsilon, vectors, include, exclude, device, cache_dir,
         no_cache, as_json, html, fail_on_intruders, fail_on_margin, fail_on_strength,
         allow_nonfinite, quiet, strict_base=False):
    from ..io.atomic import write_text
    from ..report.track_table import track_table
    from ..spectral.margin import fail_code
    from ..track import dumps, run_compare, run_track
    from ..types import ScanConfig

    eps = float_list(epsilon, "--epsilon")
    if not no_cache and cache_dir is None:
        cache_dir = settings.cache_dir_explicit()
    config = ScanConfig(top_k=top_k, epsilons=eps, vectors=vectors, include=include,
                        exclude=exclude, device=device, allow_nonfinite=allow_nonfinite,
                        cache_dir=None if no_cache else cache_dir)
    inputs = [base, *paths]
    check_targets([Target(output, "-o"), Target(html, "--html") if html else None], inputs)
    runner = run_track if mode == "track" else run_compare
    tr = runner(base, list(paths), config, progress=not quiet and not as_json,
                command=" ".join(["intruder"] + sys.argv[1:]), strict_base=strict_base)
    from ..spectral.multi import is_primary

    if not is_primary():  # torchrun: rank 0 writes and prints the document
        return
    for e in tr.entries:
        report_base_check(e.vs_base.tuned, quiet)
    text = dumps(tr)
    write_text(output, text + "\n")
    if html:
        from ..report.track_view import write_track_html

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
