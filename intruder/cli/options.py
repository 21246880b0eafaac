"""Options declared once for every command that scans (scan, compare, track, scale BASE TUNED).

The defaults come from the library's `ScanConfig`; the cache directory's default from
intruder/settings.py ($INTRUDER_CACHE_DIR, else the XDG cache), so the CLI, the Python API
and the help texts cannot drift apart. `scan_config` turns the parsed values into the
`ScanConfig` a command hands to the library; `command_line` is the invocation recorded in
reports (the library itself never reads sys.argv).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .. import exitcodes, settings
from ..types import ScanConfig
from .common import FINITE_FLOAT, float_list

F = TypeVar("F", bound=Callable[..., Any])

DEFAULTS = ScanConfig()
VECTORS = ("left", "right", "both")
# the parameter names `scan_options` adds, in the order of `scan_config`'s arguments
SCAN_PARAMS = ("top_k", "epsilon", "vectors", "include", "exclude", "device", "cache_dir",
               "no_cache", "allow_nonfinite")

EPSILON_HELP = ("Threshold on max |cos|; a comma list (0.3,0.5,0.7,0.9) also counts at each. "
                "The first value decides the listed intruders.")
DEVICE_HELP = "auto (every visible GPU, else the CPU), cpu, cuda, cuda:N or cuda:N,M."
CACHE_HELP = ("Base spectral cache (on by default: $INTRUDER_CACHE_DIR, else "
              "$XDG_CACHE_HOME/intruder or ~/.cache/intruder). Another fine-tune of the same base "
              "reuses its decomposition; see `intruder cache list|clear`.")


def _epsilon_text(values: tuple[float, ...]) -> str:
    return ",".join(format(v, "g") for v in values)


def _with(help_text: str, notes: dict[str, str], name: str) -> str:
    note = notes.get(name)
    return f"{help_text} {note}" if note else help_text


def scan_options(fn: F | None = None, *, notes: dict[str, str] | None = None) -> Any:
    """Add the scan settings (--top-k --epsilon --vectors --include --exclude --device
    --cache-dir --no-cache --allow-nonfinite) with ScanConfig's defaults. `notes` appends a
    command's own remark to an option's help, keyed by parameter name."""
    extra = notes or {}

    def decorate(f: F) -> F:
        opts = [
            click.option("--top-k", default=DEFAULTS.top_k, show_default=True, type=int,
                         help=_with("How many top tuned singular vectors to test.", extra,
                                    "top_k")),
            click.option("--epsilon", "epsilon", default=_epsilon_text(DEFAULTS.epsilons),
                         show_default=True, metavar="EPS[,EPS...]",
                         help=_with(EPSILON_HELP, extra, "epsilon")),
            click.option("--vectors", type=click.Choice(VECTORS), default=DEFAULTS.vectors,
                         show_default=True,
                         help=_with("Which singular vectors to match (paper: left).", extra,
                                    "vectors")),
            click.option("--include", metavar="REGEX",
                         help=_with("Also scan tensors matching REGEX (embeddings, lm_head...).",
                                    extra, "include")),
            click.option("--exclude", metavar="REGEX",
                         help=_with("Do not scan tensors matching REGEX.", extra, "exclude")),
            click.option("--device", default=DEFAULTS.device, show_default=True,
                         help=_with(DEVICE_HELP, extra, "device")),
            click.option("--cache-dir", metavar="DIR", default=None,
                         help=_with(CACHE_HELP, extra, "cache_dir")),
            click.option("--no-cache", is_flag=True,
                         help=_with("Do not read or write the base spectral cache.", extra,
                                    "no_cache")),
            click.option("--allow-nonfinite", is_flag=True,
                         help=_with("Skip (and list) layers with NaN/Inf instead of failing.",
                                    extra, "allow_nonfinite")),
        ]
        for o in reversed(opts):
            f = o(f)
        return f

    return decorate(fn) if fn is not None else decorate


def fail_options(fn: F) -> F:
    """Add --fail-on-intruders, --fail-on-margin and --fail-on-strength (exit codes 3 and 4)."""
    opts = [
        click.option("--fail-on-intruders", is_flag=True,
                     help=f"Exit with code {exitcodes.INTRUDERS} when any intruder is found "
                          f"(against BASE)."),
        click.option("--fail-on-margin", type=FINITE_FLOAT, default=None, metavar="COS",
                     help=f"Exit with code {exitcodes.MARGIN} when a matrix's lowest max|cos| "
                          "lies within COS of epsilon (min max|cos| < epsilon + COS): close to, "
                          "or past, its first intruder. See docs/margin.md."),
        click.option("--fail-on-strength", type=FINITE_FLOAT, default=None, metavar="X",
                     help=f"Exit with code {exitcodes.MARGIN} when a matrix's novel strength "
                          "||(I - U0_k U0_k^T) dW||_2 / sigma_k(W0) reaches X (a new direction "
                          "enters the top-k near 1)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def quiet_option(fn: F) -> F:
    return click.option("-q", "--quiet", is_flag=True,
                        help="No progress bars or chatter on stderr.")(fn)


def cache_root(cache_dir: str | None, no_cache: bool) -> str | None:
    """The base spectral cache a scan uses: None with --no-cache, else --cache-dir, else the
    settings' default ($INTRUDER_CACHE_DIR, else the XDG cache)."""
    if no_cache:
        return None
    return cache_dir if cache_dir is not None else settings.cache_dir()


def scan_config(top_k: int, epsilon: str, vectors: str, include: str | None,
                exclude: str | None, device: str, cache_dir: str | None, no_cache: bool,
                allow_nonfinite: bool) -> ScanConfig:
    """The ScanConfig of `scan_options`' values (a usage error names a bad --epsilon)."""
    return ScanConfig(top_k=top_k, epsilons=float_list(epsilon, "--epsilon"), vectors=vectors,
                      include=include, exclude=exclude, device=device,
                      allow_nonfinite=allow_nonfinite, cache_dir=cache_root(cache_dir, no_cache))


def pop_scan_config(kw: dict[str, Any]) -> ScanConfig:
    """Remove `scan_options`' values from a command's keyword arguments; their ScanConfig."""
    return scan_config(**{name: kw.pop(name) for name in SCAN_PARAMS})


def command_line() -> str:
    """This invocation as recorded in reports: `intruder` and the arguments as given."""
    return " ".join(["intruder", *sys.argv[1:]])
