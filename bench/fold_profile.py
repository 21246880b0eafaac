"""Summarise a py-spy raw (folded) profile of `intruder scan` (bench/profile_scan.sh): per thread
group, where its samples sit (waiting for the GIL, a CUDA synchronisation, LAPACK, waiting for
work, Python), the innermost Python frames that hold the most samples, and the
leaf frames (native ones with --native).

    python bench/fold_profile.py PROFILE.txt [--top 30]
"""

from __future__ import annotations

import argparse
import collections
import re

CLASSES = (  # first match from the leaf upwards wins
    ("gil-wait", ("take_gil", "PyEval_RestoreThread", "PyEval_AcquireThread",
                  "PyGILState_Ensure")),
    ("cuda-sync", ("cudaStreamSynchronize", "cuStreamSynchronize", "cudaDeviceSynchronize",
                   "cudaMemcpy", "cuMemcpy", "cudaEventSynchronize", "cuEventSynchronize",
                   "local_scalar_dense")),
    ("lapack", ("dsyev", "dstemr", "dsytrd", "dormtr", "dlarf", "dpotrf", "syevr", "dlasr",
                "dsterf", "dsteqr", "mkl_lapack", "lapack")),
    ("wait-work", ("pthread_cond_wait", "pthread_cond_timedwait", "sem_wait", "futex",
                   "select", "epoll")),
    ("read", ("pread", "read (", "memcpy", "__memmove")),
)


PY_FRAME = re.compile(r"\(\S+\.py:\d+\)")  # py-spy shortens paths: file.py or pkg/file.py


def classify(frames):
    for f in reversed(frames):
        for name, keys in CLASSES:
            if any(k in f for k in keys):
                return name
    return "python/other"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    groups = collections.Counter()
    cls = collections.defaultdict(collections.Counter)
    own = collections.defaultdict(collections.Counter)
    leaf = collections.defaultdict(collections.Counter)
    for line in open(a.profile):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, n = line.rpartition(" ")
        n = int(n)
        frames = stack.split(";")
        head = frames[0]  # thread (tid): name
        m = re.match(r"thread \(\w+\): (.*)", head)
        tname = m.group(1) if m else head
        group = re.sub(r"-\d+$", "-*", tname)
        groups[group] += n
        frames = frames[1:]
        c = classify(frames)
        cls[group][c] += n
        inner = next((f for f in reversed(frames) if PY_FRAME.search(f)), None)
        own[group][(inner or "-") + " [" + c + "]"] += n
        leaf[group][re.sub(r" \(.*", "", frames[-1]) if frames else "-"] += n
    for g, tot in groups.most_common():
        parts = ", ".join(f"{k} {v / tot:.0%}" for k, v in cls[g].most_common())
        print(f"\n## {g}: {tot} samples: {parts}")
        for f, v in own[g].most_common(a.top):
            print(f"{v:7d} {v / tot:6.1%}  {f}")
        print("  leaf frames: " + ", ".join(f"{f} {v / tot:.1%}"
                                           for f, v in leaf[g].most_common(12)))


if __name__ == "__main__":
    main()
