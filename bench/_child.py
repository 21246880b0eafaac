"""Run `intruder ARGS...` in this process and record its peak RSS (ru_maxrss) to the file named by
$INTRUDER_BENCH_RSS on exit: the benchmark's whole-process measurement of `intruder scan`."""

import atexit
import os
import resource
import sys


def _record():
    path = os.environ.get("INTRUDER_BENCH_RSS")
    if path:
        with open(path, "w") as fh:
            fh.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


atexit.register(_record)
from intruder.cli import main  # noqa: E402

sys.argv = ["intruder"] + sys.argv[1:]
main()
