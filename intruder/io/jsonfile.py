"""One careful reader for every JSON file the tool is given (indexes, adapter configs, scan
reports, scale results): regular files only, a size cap, duplicate keys refused, and every
failure turned into the caller's one-line error type."""

from __future__ import annotations

from typing import Optional, Type

from ..errors import CheckpointError, IntruderError
from .safetensors_file import DuplicateKeyError, open_regular, strict_json

MAX_JSON = 64 * 1024 * 1024  # an index or a config is kilobytes; refuse memory bombs


def read_json(path: str, error: Type[IntruderError] = CheckpointError, what: str = "JSON file",
              max_bytes: Optional[int] = MAX_JSON) -> object:
    """Parse the JSON document at `path`; any problem raises `error` naming the file."""
    try:
        fh, st = open_regular(path, what)
    except CheckpointError as exc:
        raise exc if error is CheckpointError else error(str(exc))
    try:
        with fh:
            if max_bytes is not None and st.st_size > max_bytes:
                raise error(f"{path}: {st.st_size} bytes is too large for a {what}")
            raw = fh.read()
        return strict_json(raw.decode("utf-8"))
    except DuplicateKeyError as exc:
        raise error(f"{path}: key {exc.key!r} appears twice; which one holds is ambiguous")
    except (ValueError, RecursionError) as exc:  # bad UTF-8 / JSON, over-long number
        raise error(f"{path}: not valid JSON ({exc.__class__.__name__})")
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})")
