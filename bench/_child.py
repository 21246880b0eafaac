"""Run `intruder ARGS...` in this process and record its peak RSS to the file named by
$INTRUDER_BENCH_RSS on exit: the benchmark's whole-process measurement of `intruder scan`.

The peak is VmHWM of /proc/self/status: this process's own high-water mark. getrusage's
ru_maxrss is not: Linux carries it across exec from the forked parent's memory, so a child of a
benchmark that had 4 GiB resident reported 4.13-4.25 GiB whatever it did (bench/NOTES.md)."""

import atexit
import os
import resource
import sys


def _peak_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


def _record():
    path = os.environ.get("INTRUDER_BENCH_RSS")
    if path:
        with open(path, "w") as fh:
            fh.write(str(_peak_bytes()))


atexit.register(_record)
from intruder.cli import main  # noqa: E402

sys.argv = ["intruder"] + sys.argv[1:]
main()
