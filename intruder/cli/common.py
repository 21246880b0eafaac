"""Shared CLI plumbing: one-line errors, quiet/debug flags, stderr chatter, stdout that fails
cleanly, finite number options and the output-target gate."""

from __future__ import annotations

import errno
import functools
import math
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, cast

import click

from .. import exitcodes
from ..errors import IntruderError, OutputError, Terminated
from ..report.table import printable

F = TypeVar("F", bound=Callable[..., Any])


def echo_err(msg: str, quiet: bool = False) -> None:
    """Human chatter goes to stderr so stdout stays clean for --json."""
    if not quiet:
        click.echo(msg, err=True)


def fail(ctx: click.Context, exc: IntruderError) -> NoReturn:
    """Print a library error as its one `Error:` line on stderr and exit with its code."""
    # one line whatever the message quotes (a path or shard name chosen by a stranger)
    click.echo(f"Error: {printable(str(exc))}", err=True)
    ctx.exit(exc.exit_code)


def handle_errors(fn: F) -> F:
    """Turn library errors into one line on stderr and exit 1; --debug re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except IntruderError as exc:
            if debug:
                raise
            fail(ctx, exc)
        except KeyboardInterrupt as exc:
            if debug:
                raise
            term = isinstance(exc, Terminated)
            click.echo(f"{'Terminated' if term else 'Interrupted'}; no partial output was left "
                       f"behind.", err=True)
            ctx.exit(exitcodes.TERMINATED if term else exitcodes.INTERRUPTED)
        except MemoryError:
            if debug:
                raise
            click.echo("Error: out of memory; no partial output was left behind", err=True)
            ctx.exit(exitcodes.ERROR)
        except RuntimeError as exc:  # torch reports a failed allocation as a RuntimeError
            if debug or not is_out_of_memory(exc):
                raise
            click.echo(f"Error: out of memory ({_first_line(exc)}); no partial output was left "
                       f"behind", err=True)
            ctx.exit(exitcodes.ERROR)

    return cast(F, wrapper)


_OOM = ("can't allocate memory", "out of memory", "cannot allocate memory", "can't start new thread")


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA) or the CPU allocator's RuntimeError."""
    return isinstance(exc, MemoryError) or any(s in str(exc).lower() for s in _OOM)


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    i = text.find("DefaultCPUAllocator: ")  # drop torch's '[enforce fail at file:line]' prefix
    text = text[i + len("DefaultCPUAllocator: "):] if i >= 0 else text
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return (lines[0] if lines else exc.__class__.__name__)[:200]


def terminal_safe(text: str) -> str:
    """Text for stdout with every control / format character escaped except line breaks and
    tabs: tables quote names from a stranger's checkpoint, which must not drive the terminal."""
    return "\n".join("\t".join(printable(part) for part in line.split("\t"))
                     for line in text.split("\n"))


def float_list(value: str, what: str) -> tuple[float, ...]:
    """Parse '0.3,0.5' into finite floats; a usage error names the option."""
    try:
        out = tuple(float(v) for v in str(value).split(",") if v.strip() != "")
    except ValueError:
        raise click.BadParameter(f"{what} must be a comma-separated list of numbers, got {value!r}") from None
    if not out:
        raise click.BadParameter(f"{what} is empty")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise click.BadParameter(f"{what} must hold finite numbers, got {bad[0]} in {value!r}")
    return out


class FiniteFloat(click.ParamType):
    """A float option that refuses nan, inf and values that overflow to inf (1e400)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float) and math.isfinite(value):
            return value
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


FINITE_FLOAT = FiniteFloat()


def emit(text: str = "") -> None:
    """Write a result to stdout. A stdout that cannot take it (a full disk, /dev/full, a reader
    that went away: `| head`) gives one error line and a non-zero exit instead of a traceback;
    the rest of the output is discarded so that the interpreter's final flush stays quiet."""
    try:
        click.echo(text)
    except OSError as exc:
        _discard_stdout()
        err = OutputError(f"standard output: cannot write ({exc.strerror or exc}); the output "
                          f"files, if any, are complete")
        if exc.errno == errno.EPIPE:
            err.exit_code = exitcodes.BROKEN_PIPE
        raise err from None


def _discard_stdout() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a test runner's stream
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass
