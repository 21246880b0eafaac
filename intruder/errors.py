"""Exceptions raised by the library; the CLI turns them into one-line messages."""

from __future__ import annotations

from . import exitcodes


class IntruderError(Exception):
    """Base class: a problem the user can fix (bad input, bad option, unwritable output)."""

    exit_code = exitcodes.ERROR


class CheckpointError(IntruderError):
    """A checkpoint file or directory is missing, malformed or unsafe."""


class AdapterError(CheckpointError):
    """A PEFT adapter is malformed or cannot be merged faithfully."""


class PairingError(IntruderError):
    """Base and tuned tensors cannot be paired (no common names, shape mismatch)."""


class NonFiniteError(IntruderError):
    """A weight contains NaN or Inf."""


class InputError(IntruderError, TypeError):
    """An input of a kind the library does not take (also a TypeError, for Python callers)."""


class ReportError(IntruderError):
    """A scan report is missing or violates the schema."""


class OutputError(IntruderError):
    """An output path is unsafe (would overwrite an input) or cannot be written."""


class EvalError(IntruderError):
    """An evaluator is unknown or its data/model cannot be used."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every temporary output is removed
    on the way out (the command line installs the handler; exit status 143)."""
