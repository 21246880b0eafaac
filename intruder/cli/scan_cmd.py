"""`intruder scan BASE TUNED`."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from ..io.targets import Target, check_targets
from ..report.table import scan_table
from . import cli
from .common import echo_err, emit, handle_errors, terminal_safe
from .hubopts import offline_option, report_base_check, strict_base_option
from .options import command_line, fail_options, pop_scan_config, quiet_option, scan_options


@cli.command("scan")
@click.argument("base", type=click.Path(file_okay=True, dir_okay=True, readable=False))
@click.argument("tuned", type=click.Path(file_okay=True, dir_okay=True, readable=False),
                required=False)
@scan_options
@click.option("-o", "--output", default="intruder-scan.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the JSON report.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout instead of the table.")
@click.option("--html", type=click.Path(dir_okay=False), default=None, help="Also write an HTML audit.")
@fail_options
@quiet_option
@strict_base_option
@offline_option
@handle_errors
def scan_command(base: str, tuned: str | None, output: str, as_json: bool, html: str | None,
                 fail_on_intruders: bool, fail_on_margin: float | None,
                 fail_on_strength: float | None, quiet: bool, strict_base: bool,
                 **scan_kw: Any) -> None:
    """Find intruder dimensions of TUNED against BASE.

    BASE: a .safetensors file, a Hugging Face model directory (sharded or not) or a .bin/.pt
    state dict. TUNED: the same kinds, or a PEFT LoRA adapter directory (merged per tensor).
    Either may be a Hugging Face model ID, org/name or org/name@revision, or one file of a
    repository, org/name[@revision]/FILE.gguf (a local path of the same spelling wins). With
    one argument, a PEFT adapter, its declared base (base_model_name_or_path) is BASE; an
    adapter given with another BASE is a warning (--strict-base: an error).

    \b
    Examples:
      intruder scan base.safetensors tuned.safetensors
      intruder scan base-dir/ adapter-dir/ --epsilon 0.3,0.5,0.7,0.9 --json
      intruder scan base-dir/ tuned-dir/ --include 'embed_tokens' --exclude 'layers\\.0\\.'
      intruder scan meta-llama/Llama-2-7b-hf someone/llama2-lora@v1.0
      intruder scan adapter-dir/
    """
    from ..report.html import write_html  # lazy: pulls torch
    from ..report.schema import dumps, save_report  # lazy: pulls torch
    from ..run.multi import is_primary  # lazy: pulls torch
    from ..scan import run_scan  # lazy: pulls torch
    from ..spectral.margin import fail_code  # lazy: pulls torch

    config = pop_scan_config(scan_kw)
    base_path: str | None = base
    if tuned is None:  # one argument: an adapter, scanned against its declared base
        if os.path.lexists(base) and not os.path.lexists(os.path.join(base, "adapter_config.json")):
            raise click.UsageError("missing TUNED: one argument alone must be a PEFT adapter "
                                   "(scanned against its declared base); give BASE and TUNED")
        base_path, tuned = None, base
    check_targets([Target(output, "-o"), *([Target(html, "--html")] if html else [])],
                  [base_path, tuned])
    report = run_scan(base_path, tuned, config, progress=not quiet and not as_json,
                      command=command_line(), strict_base=strict_base)
    report_base_check(report.tuned, quiet)
    if not is_primary():  # torchrun: rank 0 writes and prints the report
        return
    save_report(report, output)
    if html:
        write_html(report, html, command=command_line())
    if as_json:
        emit(dumps(report))
    else:
        emit(terminal_safe(scan_table(report)))
        echo_err(f"report written to {output}", quiet)
    if html:
        echo_err(f"HTML audit written to {html}", quiet)
    code = fail_code([report], fail_on_intruders, fail_on_margin, fail_on_strength)
    if code:
        sys.exit(code)
