"""Every INTRUDER_* environment variable, read and validated here and nowhere else.

Unset or empty means the default. A value that is not what the table says stops the command
with one line naming the variable, the value and what it must be (`SettingsError`), never a
traceback or a hang. Values are read at call time (tests and long-lived processes may change
them).

=========================  ==========================================  ======================  ======================
variable                   meaning                                     default                 overridden by
=========================  ==========================================  ======================  ======================
INTRUDER_CACHE_DIR         root of the base spectral cache and of      $XDG_CACHE_HOME/         --cache-dir DIR;
                           remembered file digests                     intruder, else           --no-cache (scan,
                                                                       ~/.cache/intruder        compare, track, scale)
INTRUDER_CACHE_MAX_GB      size limit of the base spectral cache in    20                      (none)
                           GiB (least recently used entries go first;
                           a number > 0)
INTRUDER_CPU_WORKERS       matrices computed at once on a CPU, each    one per core, at most   (none)
                           with cores / workers BLAS threads (1-256)   4
INTRUDER_STREAMS           worker threads (one CUDA stream each) per   3                       (none)
                           GPU (1-64)
INTRUDER_READERS           threads reading tensors ahead of the        CPU 1; CUDA             (none)
                           devices (1-64)                              min(8, max(2, cores/2))
INTRUDER_HOST_BUDGET_MB    host memory for tensors read ahead, MiB     512, or (workers + 1)   (none)
                           (a number > 0; one pair is always read)     x the largest item, at
                                                                       most 4096
INTRUDER_EXACT_DIM         largest Gram size (smaller matrix side)     256                     (none)
                           decomposed exactly outright (0-2^31)
INTRUDER_SLICE_MIN_DIM     smallest Gram size where spectral slices    768                     (none)
                           replace the complete base (0: never)
INTRUDER_HASH_WORKERS      input files hashed at once for the          half the cores, 1 to 4  (none)
                           report's content identity (1-64)
INTRUDER_DATA_DIR          folder holding wikitext-2-raw/              (none)                  eval wikitext:PATH;
                           wiki.test.raw (and the tests' shared data)                          demo --data-dir
INTRUDER_WIKITEXT          the wiki.test.raw file itself (checked      (none)                  eval wikitext:PATH
                           before INTRUDER_DATA_DIR)
=========================  ==========================================  ======================  ======================

The command line checks every variable once at start (`check_all`), so a mistyped value in any
of them is reported before any work, whichever command reads it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

from . import exitcodes
from .errors import IntruderError


class SettingsError(IntruderError):
    """An INTRUDER_* environment variable holds a value that cannot be used."""

    exit_code = exitcodes.USAGE


@dataclass(frozen=True)
class Knob:
    name: str
    meaning: str
    default: str  # as documented
    flag: str  # CLI option that overrides it, or ""
    parse: Callable[[str, str], object]  # (name, raw text) -> value; raises SettingsError


def _bad(name: str, raw: str, what: str) -> SettingsError:
    shown = raw if len(raw) <= 60 else raw[:57] + "..."
    return SettingsError(f"${name}={shown!r}: must be {what}; unset it for the default")


def _int(lo: int, hi: int, what: str):
    def parse(name: str, raw: str) -> int:
        try:
            v = int(raw.strip(), 10)
        except ValueError:
            raise _bad(name, raw, f"a whole number from {lo} to {hi} ({what})") from None
        if not lo <= v <= hi:
            raise _bad(name, raw, f"a whole number from {lo} to {hi} ({what})")
        return v
    return parse


def _positive(hi: float, what: str):
    def parse(name: str, raw: str) -> float:
        try:
            v = float(raw.strip())
        except ValueError:
            raise _bad(name, raw, f"a number above 0 and at most {hi:g} ({what})") from None
        if not (math.isfinite(v) and 0 < v <= hi):
            raise _bad(name, raw, f"a number above 0 and at most {hi:g} ({what})")
        return v
    return parse


def _path(what: str):
    def parse(name: str, raw: str) -> str:
        if "\0" in raw or not raw.strip():
            raise _bad(name, raw, f"a path ({what})")
        return os.path.expanduser(raw)
    return parse


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("INTRUDER_CACHE_DIR", "root of the base spectral cache and remembered file digests",
         "$XDG_CACHE_HOME/intruder, else ~/.cache/intruder", "--cache-dir, --no-cache",
         _path("a directory for the cache")),
    Knob("INTRUDER_CACHE_MAX_GB", "size limit of the base spectral cache, GiB", "20", "",
         _positive(1e6, "GiB")),
    Knob("INTRUDER_CPU_WORKERS", "matrices computed at once on a CPU", "one per core, at most 4",
         "", _int(1, 256, "worker threads")),
    Knob("INTRUDER_STREAMS", "worker threads (CUDA streams) per GPU", "3", "",
         _int(1, 64, "streams per GPU")),
    Knob("INTRUDER_READERS", "threads reading tensors ahead of the devices",
         "CPU 1; CUDA min(8, max(2, cores / 2))", "", _int(1, 64, "reader threads")),
    Knob("INTRUDER_HOST_BUDGET_MB", "host memory for tensors read ahead, MiB",
         "512, or (workers + 1) x the largest item, at most 4096", "",
         _positive(1 << 30, "MiB")),
    Knob("INTRUDER_EXACT_DIM", "largest Gram size decomposed exactly outright", "256", "",
         _int(0, 1 << 31, "matrix side")),
    Knob("INTRUDER_SLICE_MIN_DIM", "smallest Gram size where spectral slices replace the "
         "complete base (0: never)", "768", "", _int(0, 1 << 31, "matrix side; 0 disables")),
    Knob("INTRUDER_HASH_WORKERS", "input files hashed at once (content identity)",
         "half the cores, 1 to 4", "", _int(1, 64, "hashing threads")),
    Knob("INTRUDER_DATA_DIR", "folder holding wikitext-2-raw/wiki.test.raw", "(none)",
         "eval wikitext:PATH, demo --data-dir", _path("the shared data folder")),
    Knob("INTRUDER_WIKITEXT", "the wiki.test.raw file", "(none)", "eval wikitext:PATH",
         _path("the WikiText-2 raw test file")),
)}


def get(name: str):
    """The parsed value of knob `name`, or None when unset or empty."""
    knob = KNOBS[name]
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    return knob.parse(name, raw)


def check_all() -> None:
    """Parse every knob; the first unusable one raises SettingsError."""
    for name in KNOBS:
        get(name)


# -- typed accessors (defaults live with the code that uses them; None = that default) ------

def cache_dir() -> str:
    """$INTRUDER_CACHE_DIR, else $XDG_CACHE_HOME/intruder, else ~/.cache/intruder."""
    v = get("INTRUDER_CACHE_DIR")
    if v:
        return v
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "intruder")


def cache_max_gb() -> float | None:
    return get("INTRUDER_CACHE_MAX_GB")


def cpu_workers() -> int | None:
    return get("INTRUDER_CPU_WORKERS")


def streams() -> int | None:
    return get("INTRUDER_STREAMS")


def readers() -> int | None:
    return get("INTRUDER_READERS")


def host_budget_mb() -> float | None:
    return get("INTRUDER_HOST_BUDGET_MB")


def exact_dim() -> int | None:
    return get("INTRUDER_EXACT_DIM")


def slice_min_dim() -> int | None:
    return get("INTRUDER_SLICE_MIN_DIM")


def hash_workers() -> int | None:
    return get("INTRUDER_HASH_WORKERS")


def data_dir() -> str | None:
    return get("INTRUDER_DATA_DIR")


def wikitext() -> str | None:
    return get("INTRUDER_WIKITEXT")


def table() -> str:
    """The knobs as a plain-text table (docs, `--help` epilogues)."""
    rows = [("variable", "meaning", "default", "overridden by")]
    rows += [(k.name, k.meaning, k.default, k.flag or "-") for k in KNOBS.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
