"""`intruder cache list|clear`: the base spectral cache."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import click

from ..errors import OutputError
from ..report.table import format_table
from . import cli
from .common import emit, handle_errors

if TYPE_CHECKING:  # the cache imports torch: not at CLI start-up
    from ..run.cache import BaseCache

_DIR_HELP = ("Cache directory (default: $INTRUDER_CACHE_DIR, else $XDG_CACHE_HOME/intruder or "
             "~/.cache/intruder).")


@cli.group("cache")
def cache_group() -> None:
    """The base spectral cache: base decompositions kept between scans.

    `intruder scan` stores each base matrix's certified top singular vectors (or all of them,
    when a scan needed all) under a key that is the sha256 of the tensor's bytes, so another
    fine-tune of the same base skips the base's decomposition. Bounded by
    INTRUDER_CACHE_MAX_GB (default 20), least recently used entries go first.

    \b
    Examples:
      intruder cache list
      intruder cache list --json
      intruder cache clear
    """


def _cache(cache_dir: str | None) -> BaseCache:
    from ..run.cache import BaseCache, default_cache_dir  # lazy: pulls torch

    return BaseCache(cache_dir or default_cache_dir())


def _size(n: int) -> str:
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024.0
    return str(x)


@cache_group.command("list")
@click.option("--cache-dir", metavar="DIR", default=None, help=_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@handle_errors
def cache_list(cache_dir: str | None, as_json: bool) -> None:
    """List cached base spectra: source tensor, shape, vectors kept, size, last use."""
    c = _cache(cache_dir)
    entries = c.entries()
    total = sum(e["bytes"] for e in entries)
    if as_json:
        emit(json.dumps({"cache_dir": c.root, "entries": entries, "bytes": total,
                               "max_bytes": c.max_bytes}, indent=2))
        return
    emit(f"base spectral cache: {c.root}")
    emit(f"{len(entries)} entries, {_size(total)} of at most {_size(c.max_bytes)} "
               f"(INTRUDER_CACHE_MAX_GB)")
    if not entries:
        return
    rows = []
    for e in sorted(entries, key=lambda e: -e["last_used"]):
        kept = "all" if e["complete"] else f"top {e['kept']}"
        rows.append([e["tensor"] or "?",
                     "x".join(str(s) for s in e["shape"]) if e["shape"] else "?",
                     e["dtype"], f"{kept} of {e['gram_dim']}", e["method"], _size(e["bytes"]),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"])),
                     e["key"][:12]])
    emit(format_table(["tensor", "shape", "dtype", "singular vectors kept", "method",
                             "size", "last used", "key (sha256)"], rows, "llllrrll"))


@cache_group.command("clear")
@click.option("--cache-dir", metavar="DIR", default=None, help=_DIR_HELP)
@handle_errors
def cache_clear(cache_dir: str | None) -> None:
    """Remove every cached base spectrum (they are recomputed when needed)."""
    c = _cache(cache_dir)
    n, size, failed = c.clear()
    if n:
        emit(f"removed {n} files ({_size(size)}) from {c.root}")
    elif not failed:
        emit(f"nothing to remove: {c.root} holds no cache files")
    if failed:
        raise OutputError(f"could not remove {len(failed)} cache file(s) "
                          f"({failed[0]}{', ...' if len(failed) > 1 else ''})")
