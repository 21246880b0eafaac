"""Where a small scan's whole-process time goes outside the scan phase: Python, torch, the CLI's
imports, CUDA context, the linear-algebra libraries' first load. Each line is the wall time of
a fresh process (median of 3), so later lines include the earlier ones.

    python bench/startup_probe.py [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = [
    ("python -c pass", "pass"),
    ("import torch", "import torch"),
    ("import intruder.cli (scan path)", "import intruder.cli, intruder.scan, intruder.run.driver, "
                                        "intruder.run.stream"),
    ("+ CUDA context", "import torch; torch.zeros(1, device='cuda'); torch.cuda.synchronize()"),
    ("+ cuBLAS/cuSOLVER first load", "import torch; from intruder.run.stream import "
                                     "_warm_linalg; _warm_linalg(torch.device('cuda'))"),
]


def wall(code: str) -> float:
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    for label, code in STEPS:
        if "cuda" in code and a.device != "cuda":
            continue
        ts = [wall(code) for _ in range(3)]
        print(f"{label}: {statistics.median(ts):.2f} s (median of 3 fresh processes)", flush=True)
    try:  # for scale: what the scan path does not import
        t = wall("import intruder.cli, intruder.scan, intruder.run.driver, matplotlib.pyplot")
        print(f"(not on the scan path) the same + matplotlib.pyplot: {t:.2f} s")
    except subprocess.CalledProcessError:
        pass


if __name__ == "__main__":
    main()
