"""Where a scan's peak host RSS comes from: one small pair (default: one 70B-shaped layer),
scanned in child processes under several settings, each printing its peak RSS and, with a
10 ms sampler, when the peak happened (seconds after start, matrices done by then).

    python bench/rss_probe.py --work /tmp/rss70 --model 70b --layers 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

CHILD = r'''
import os, sys, threading, time, resource
peak = [0, 0.0]
t0 = time.perf_counter()
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
stop = False
def sample():
    while not stop:
        r = rss()
        if r > peak[0]:
            peak[0], peak[1] = r, time.perf_counter() - t0
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
from intruder.cli import main
sys.argv = ["intruder"] + sys.argv[1:]
try:
    main()
except SystemExit:
    pass
stop = True
extra = ""
try:
    import torch
    st = torch.cuda.host_memory_stats()
    extra = " pinned peak %.2f GiB" % (st.get("allocated_bytes.all.peak", 0) / 2**30)
except Exception as exc:
    extra = " (no host_memory_stats: %s)" % type(exc).__name__
print("RSS peak %.2f GiB at %.1f s of %.1f s; ru_maxrss %.2f GiB%s" % (
    peak[0] / 2**30, peak[1], time.perf_counter() - t0,
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, extra), file=sys.stderr)
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/rss-probe")
    ap.add_argument("--model", default="70b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from synth_models import build

    if not os.path.exists(os.path.join(a.work, "bench_meta.json")):
        build(a.model, a.work, a.layers, a.device)
    base, tuned = os.path.join(a.work, "base"), os.path.join(a.work, "tuned")
    cache = os.path.join(a.work, "cache")
    runs = [("no cache", {}, ["--no-cache"]),
            ("cache cold", {}, ["--cache-dir", cache]),
            ("cache warm", {}, ["--cache-dir", cache]),
            ("cold, budget 128 MiB", {"INTRUDER_HOST_BUDGET_MB": "128"}, ["--cache-dir", cache + "2"]),
            ("cold, MALLOC_ARENA_MAX=2", {"MALLOC_ARENA_MAX": "2"}, ["--cache-dir", cache + "3"]),
            ("cold, 1 stream", {"INTRUDER_STREAMS": "1"}, ["--cache-dir", cache + "4"]),
            ("no cache, 1 reader thread", {"INTRUDER_READERS": "1"}, ["--no-cache"])]
    for label, env, extra in runs:
        e = dict(os.environ, CUDA_VISIBLE_DEVICES="0", PYTHONPATH=ROOT, **env)
        p = subprocess.run([sys.executable, "-c", CHILD, "scan", base, tuned, "-q", "-o",
                            os.path.join(a.work, "out.json"), "--device", a.device, *extra], env=e,
                           capture_output=True, text=True)
        last = [l for l in p.stderr.splitlines() if l.startswith("RSS")]
        print(f"{label:28s} exit {p.returncode}: {last[-1] if last else p.stderr[-500:]}", flush=True)
    for c in (cache, cache + "2", cache + "3", cache + "4"):
        shutil.rmtree(c, ignore_errors=True)


if __name__ == "__main__":
    main()
