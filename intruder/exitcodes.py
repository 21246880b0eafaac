"""Exit statuses of the `intruder` command, defined once (the CLI, the library's error classes and
the audit gates read them from here; docs/cli.md and the --help texts quote them).

    0    done
    1    an error the user can fix (bad input, bad option value, unwritable output), one line
    2    usage error (unknown option, missing argument): click's own status
    3    --fail-on-intruders and an intruder was found
    4    --fail-on-margin / --fail-on-strength and a matrix lies inside the margin
    130  interrupted (Ctrl-C); no partial output is left behind
    141  standard output was closed early (a broken pipe, e.g. `| head`): 128 + SIGPIPE
    143  terminated (SIGTERM); no partial output is left behind
"""

from __future__ import annotations

OK = 0
ERROR = 1
USAGE = 2
INTRUDERS = 3
MARGIN = 4
INTERRUPTED = 130
BROKEN_PIPE = 141
TERMINATED = 143

__all__ = ["BROKEN_PIPE", "ERROR", "INTERRUPTED", "INTRUDERS", "MARGIN", "OK", "TERMINATED",
           "USAGE"]
