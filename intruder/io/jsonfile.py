"""One careful reader for every JSON file the tool is given (indexes, adapter configs, scan
reports, scale results, task files): regular files only, a size cap, duplicate keys refused,
numbers that JSON allows and Python can hold (no NaN/Infinity, no 5000-digit integers, no float
beyond the double range), bounded nesting, and every failure turned into the caller's one-line
error type naming the file."""

from __future__ import annotations

import json

from ..errors import CheckpointError, IntruderError
from .safetensors_file import DuplicateKeyError, no_duplicate_keys, open_regular

MAX_JSON = 64 * 1024 * 1024  # an index or a config is kilobytes; refuse memory bombs
# scan reports, scale results, task files: megabytes in practice (a 70B-parameter scan at
# top-k 10 is ~5 MB); parsing costs about six times the file size in memory
MAX_LARGE_JSON = 128 * 1024 * 1024
MAX_DEPTH = 64  # the tool's own documents nest 6 deep
MAX_NUMBER_CHARS = 400  # longer literals are not numbers anyone wrote by hand or by tool


class _Invalid(ValueError):
    """A document that parses as JSON but holds what the tool refuses; the text is the reason."""


def _parse_int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Invalid(f"a number of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Invalid(f"a number of {len(text)} characters")
    v = float(text)
    if v in (float("inf"), float("-inf")):
        raise _Invalid(f"the number {text[:40]} is beyond the double-precision range")
    return v


def _parse_constant(name: str):
    raise _Invalid(f"{name} is not a JSON value")


def _depth(doc) -> int:
    """Deepest nesting of lists and objects, without recursion."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((x, d + 1) for x in v if isinstance(x, (list, dict)))
    return deepest


def loads(text: str) -> object:
    """Parse one JSON document strictly. Raises DuplicateKeyError, _Invalid (with the reason),
    json.JSONDecodeError or RecursionError."""
    doc = json.loads(text, object_pairs_hook=no_duplicate_keys, parse_int=_parse_int,
                     parse_float=_parse_float, parse_constant=_parse_constant)
    if _depth(doc) > MAX_DEPTH:
        raise _Invalid(f"nested more than {MAX_DEPTH} levels deep")
    return doc


def _read_text(path: str, error: type[IntruderError], what: str, max_bytes: int | None) -> str:
    cap = MAX_LARGE_JSON if max_bytes is None else max_bytes
    try:
        fh, st = open_regular(path, what)
    except CheckpointError as exc:
        raise exc if error is CheckpointError else error(str(exc)) from None
    try:
        with fh:
            if st.st_size > cap:
                raise error(f"{path}: {st.st_size} bytes is too large for a {what} (at most "
                            f"{cap // (1024 * 1024)} MiB)")
            raw = fh.read(cap + 1)
            if len(raw) > cap:  # grew since the stat
                raise error(f"{path}: more than {cap} bytes; too large for a {what}")
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid JSON (not UTF-8 text at byte {exc.start})") from None


def _parse(text: str, path: str, error: type[IntruderError], where: str = "") -> object:
    try:
        return loads(text)
    except DuplicateKeyError as exc:
        raise error(f"{path}{where}: key {exc.key!r} appears twice; which one holds is "
                    f"ambiguous") from None
    except _Invalid as exc:
        raise error(f"{path}{where}: not valid JSON ({exc})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}{where}: not valid JSON ({exc.msg} at line {exc.lineno} column "
                    f"{exc.colno})") from None
    except RecursionError:
        raise error(f"{path}{where}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # anything else the decoder refuses
        raise error(f"{path}{where}: not valid JSON ({exc.__class__.__name__})") from None


def read_json(path: str, error: type[IntruderError] = CheckpointError, what: str = "JSON file",
              max_bytes: int | None = MAX_JSON) -> object:
    """Parse the JSON document at `path`; any problem raises `error` naming the file.
    max_bytes=None selects MAX_LARGE_JSON (reports, results): no read is uncapped."""
    return _parse(_read_text(path, error, what, max_bytes), path, error)


def read_jsonl(path: str, error: type[IntruderError] = CheckpointError, what: str = "JSONL file",
               max_bytes: int | None = None) -> list[object]:
    """One JSON document per non-blank line (JSON Lines); errors name the file and line."""
    text = _read_text(path, error, what, max_bytes)
    return [_parse(line, path, error, f" line {i}")
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]


__all__ = ["MAX_DEPTH", "MAX_JSON", "MAX_LARGE_JSON", "loads", "read_json", "read_jsonl"]
