"""`intruder report [SCAN_JSON] -o audit.html`: the self-contained HTML audit of a scan."""

from __future__ import annotations

import os

import click

from ..io.targets import Target, check_targets, create_parents, remove_dirs
from . import cli
from .common import echo_err, handle_errors
from .options import command_line


@cli.command("report")
@click.argument("scan_json", required=False, default="intruder-scan.json",
                type=click.Path(dir_okay=False, readable=False))
@click.option("-o", "--output", default="intruder-audit.html", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the HTML audit.")
@click.option("--scale-results", type=click.Path(dir_okay=False, readable=False), default=None,
              help="scale-results.json of an `intruder scale --eval` run: adds the trade-off plot "
                   "and table.")
@click.option("--similarity/--no-similarity", default=None,
              help="Recompute the similarity heatmaps from the checkpoints (default: only when "
                   "they are at their scanned paths, unchanged, and the chosen matrices are at "
                   "most 2048 on their short side).")
@click.option("--base", "base_path", type=click.Path(readable=False), default=None,
              help="Where the base checkpoint is now, if it moved since the scan.")
@click.option("--tuned", "tuned_path", type=click.Path(readable=False), default=None,
              help="Where the tuned checkpoint is now, if it moved since the scan.")
@click.option("--layers", "n_affected", default=3, show_default=True, type=click.IntRange(1, 12),
              help="How many of the most affected matrices get a similarity heatmap.")
@click.option("-q", "--quiet", is_flag=True, help="No chatter on stderr.")
@handle_errors
def report_command(scan_json: str, output: str, scale_results: str | None,
                   similarity: bool | None, base_path: str | None, tuned_path: str | None,
                   n_affected: int, quiet: bool) -> None:
    """Write a self-contained HTML audit of SCAN_JSON (default: intruder-scan.json).

    One file with CSS, script and figures inline: it opens offline in any browser. It holds the
    verdict, both checkpoints' identity, a layer x module grid, similarity heatmaps, the
    max|cos| distribution, counts against epsilon, spectra, a sortable per-layer table and the
    provenance.

    \b
    Examples:
      intruder report intruder-scan.json -o reports/audit.html
      intruder report scan.json --scale-results out/scale-results.json --similarity
      intruder report scan.json --base /models/base --tuned /models/ft -o audit.html
    """
    from ..report.html import write_html  # lazy: pulls torch
    from ..report.schema import load_report  # lazy: pulls torch

    report = load_report(scan_json)
    # a scan run elsewhere recorded paths relative to its own directory: try beside the JSON too
    base_path = base_path or _beside(report.base.path, scan_json)
    tuned_path = tuned_path or _beside(report.tuned.path, scan_json)
    recorded = [p for p in (report.base.path, report.tuned.path) if p and os.path.exists(p)]
    inputs = [scan_json] + [p for p in (scale_results, base_path, tuned_path) if p] + recorded
    check_targets([Target(output, "-o", make_parents=True)], inputs)
    made = create_parents(output)
    try:
        info = write_html(report, output, scale_results=scale_results, similarity=similarity,
                          base_path=base_path, tuned_path=tuned_path, n_affected=n_affected,
                          command=command_line())
    except BaseException:  # a failure leaves no empty folders behind
        remove_dirs(made)
        raise
    echo_err(f"HTML audit written to {output} ({info.bytes / 1e3:.0f} kB, {info.figures} "
             f"figures; similarity heatmaps {info.similarity})", quiet)


def _beside(path: str | None, scan_json: str) -> str | None:
    """`path` relative to the scan JSON's directory, when it is not found from here but is there."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return None
    cand = os.path.join(os.path.dirname(os.path.abspath(scan_json)), path)
    return cand if os.path.exists(cand) else None
