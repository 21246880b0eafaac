"""`intruder scan BASE TUNED`."""

from __future__ import annotations

import sys

import click

from .. import exitcodes
from ..io.targets import Target, check_targets
from . import cli
from .common import FINITE_FLOAT, echo_err, emit, float_list, handle_errors, terminal_safe
from .hubopts import offline_option, report_base_check, strict_base_option


@cli.command("scan")
@click.argument("base", type=click.Path(file_okay=True, dir_okay=True, readable=False))
@click.argument("tuned", type=click.Path(file_okay=True, dir_okay=True, readable=False),
                required=False)
@click.option("--top-k", default=10, show_default=True, type=int,
              help="How many top tuned singular vectors to test.")
@click.option("--epsilon", "epsilon", default="0.5", show_default=True,
              help="Threshold on max |cos|; a comma list (0.3,0.5,0.7,0.9) also counts at each. "
                   "The first value decides the listed intruders.")
@click.option("--vectors", type=click.Choice(["left", "right", "both"]), default="left",
              show_default=True, help="Which singular vectors to match (paper: left).")
@click.option("--include", metavar="REGEX", help="Also scan tensors matching REGEX (embeddings, lm_head...).")
@click.option("--exclude", metavar="REGEX", help="Do not scan tensors matching REGEX.")
@click.option("--device", default="auto", show_default=True,
              help="auto (every visible GPU, else the CPU), cpu, cuda, cuda:N or cuda:N,M.")
@click.option("--cache-dir", metavar="DIR", default=None,
              help="Base spectral cache (on by default: $INTRUDER_CACHE_DIR, else "
                   "$XDG_CACHE_HOME/intruder or ~/.cache/intruder). Another fine-tune of the "
                   "same base reuses its decomposition; see `intruder cache list|clear`.")
@click.option("--no-cache", is_flag=True, help="Do not read or write the base spectral cache.")
@click.option("-o", "--output", default="intruder-scan.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where to write the JSON report.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report to stdout instead of the table.")
@click.option("--html", type=click.Path(dir_okay=False), default=None, help="Also write an HTML audit.")
@click.option("--fail-on-intruders", is_flag=True,
              help=f"Exit with code {exitcodes.INTRUDERS} when any intruder is found.")
@click.option("--fail-on-margin", type=FINITE_FLOAT, default=None, metavar="COS",
              help=f"Exit with code {exitcodes.MARGIN} when a matrix's lowest max|cos| lies "
                   "within COS of epsilon (min max|cos| < epsilon + COS): close to, or past, its "
                   "first intruder. "
                   "See docs/margin.md.")
@click.option("--fail-on-strength", type=FINITE_FLOAT, default=None, metavar="X",
              help=f"Exit with code {exitcodes.MARGIN} when a matrix's novel strength "
                   "||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0) reaches X (a new direction enters "
                   "the top-k near 1).")
@click.option("--allow-nonfinite", is_flag=True, help="Skip (and list) layers with NaN/Inf instead of failing.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or chatter on stderr.")
@strict_base_option
@offline_option
@handle_errors
def scan_command(base, tuned, top_k, epsilon, vectors, include, exclude, device, cache_dir, no_cache,
                 output, as_json, html, fail_on_intruders, fail_on_margin, fail_on_strength,
                 allow_nonfinite, quiet, strict_base):
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
    from ..report.schema import dumps, save_report
    from ..report.table import scan_table
    from ..scan import run_scan
    from ..types import ScanConfig

    eps = float_list(epsilon, "--epsilon")
    if not no_cache and cache_dir is None:
        from ..spectral.cache import default_cache_dir

        cache_dir = default_cache_dir()
    config = ScanConfig(top_k=top_k, epsilons=eps, vectors=vectors, include=include,
                        exclude=exclude, device=device, allow_nonfinite=allow_nonfinite,
                        cache_dir=None if no_cache else cache_dir)
    if tuned is None:  # one argument: an adapter, scanned against its declared base
        import os

        if os.path.lexists(base) and not os.path.lexists(os.path.join(base, "adapter_config.json")):
            raise click.UsageError("missing TUNED: one argument alone must be a PEFT adapter "
                                   "(scanned against its declared base); give BASE and TUNED")
        base, tuned = None, base
    check_targets([Target(output, "-o"), Target(html, "--html") if html else None], [base, tuned])
    report = run_scan(base, tuned, config, progress=not quiet and not as_json,
                      command=" ".join(["intruder"] + sys.argv[1:]), strict_base=strict_base)
    report_base_check(report.tuned, quiet)
    from ..spectral.multi import is_primary

    if not is_primary():  # torchrun: rank 0 writes and prints the report
        return
    save_report(report, output)
    if html:
        from ..report.html import write_html

        write_html(report, html)
    if as_json:
        emit(dumps(report))
    else:
        emit(terminal_safe(scan_table(report)))
        echo_err(f"report written to {output}", quiet)
    if html:
        echo_err(f"HTML audit written to {html}", quiet)
    from ..spectral.margin import fail_code

    code = fail_code([report], fail_on_intruders, fail_on_margin, fail_on_strength)
    if code:
        sys.exit(code)
