"""Memory stays bounded: a scan streams tensors, so a pair larger than the memory the process may
use is still scanned, exactly; and running out of memory is one clear line, not a hang.

A subprocess imports everything and runs one tiny warm-up scan, measures its address space
(VmSize), then caps it with RLIMIT_AS at that baseline plus MARGIN, which is smaller than either
checkpoint. Under the cap, merely holding one checkpoint's bytes fails (shown first, so the cap is
known to bite), yet `intruder scan` over the pair succeeds and finds the planted intruders. Then
the cap is lowered to 4 MiB above the process's size: the scan must fail with one line.

Calibration: RLIMIT_AS counts address space, not memory. glibc reserves 64 MiB of address space
per thread arena and raises its mmap threshold dynamically, so the subprocess runs with one arena
and a fixed mmap threshold (MALLOC_ARENA_MAX=1, MALLOC_MMAP_THRESHOLD_): address space then
tracks live memory. The read-ahead budget is set small (INTRUDER_HOST_BUDGET_MB) because the
bound being proven is "budget + one pair", independent of the checkpoint's size.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import synthetic  # fixtures/, on sys.path via conftest

MiB = 1 << 20
BIG = 1024  # (BIG, BIG) float32 matrices: 4 MiB each
N_BIG = 40  # per checkpoint: 160 MiB of big matrices
MARGIN = 96 * MiB  # address space allowed above the warmed-up baseline
BUDGET_MB = 32  # tensors read ahead of the computation
SMALL = 192  # planted layers: (SMALL, SMALL), intruder at rank 1 (0-based)
PLANTED = {"model.layers.0.self_attn.q_proj.weight": 1, "model.layers.1.self_attn.q_proj.weight": 1}


def _write_pair(base_path: str, tuned_path: str, n_big: int = N_BIG) -> int:
    """Stream two safetensors files to disk, one tensor at a time; return the smaller file size.

    Big matrices are identical in both files (still read from both and compared); the planted
    matrices differ by one new direction each."""
    rng = np.random.default_rng(0)
    specs = [(f"model.layers.{i}.mlp.up_proj.weight", (BIG, BIG)) for i in range(n_big)]
    small = {}
    for j, name in enumerate(PLANTED):
        w0, wt, _ = synthetic.plant(SMALL, SMALL, [PLANTED[name]], seed=10 + j)
        small[name] = (w0.astype(np.float32), wt.astype(np.float32))
        specs.append((name, (SMALL, SMALL)))
    header, pos = {}, 0
    for name, shape in specs:
        n = shape[0] * shape[1] * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    with open(base_path, "wb") as fb, open(tuned_path, "wb") as ft:
        for fh in (fb, ft):
            fh.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in specs:
            if name in small:
                fb.write(small[name][0].tobytes())
                ft.write(small[name][1].tobytes())
            else:
                block = rng.standard_normal(shape, dtype=np.float32).tobytes()
                fb.write(block)
                ft.write(block)
    return min(os.path.getsize(base_path), os.path.getsize(tuned_path))


_DRIVER = r"""
import io, json, os, resource, sys, traceback
base, tuned, warm_base, warm_tuned, out, margin, size = sys.argv[1:8]
margin, size = int(margin), int(size)
from intruder.cli import cli

def run(args):
    err, real = io.StringIO(), sys.stderr
    sys.stderr = err
    try:
        cli.main(args=args, prog_name="intruder")
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        code = "escaped: " + traceback.format_exc()
    finally:
        sys.stderr = real
    return code, err.getvalue()

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def cap(extra):
    limit = status("VmSize") + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit

res = {"warm": run(["scan", warm_base, warm_tuned, "-q", "-o", out + ".warm.json"])}
res["baseline"] = status("VmSize")
res["limit"] = cap(margin)
try:  # the cap bites: one checkpoint's bytes do not fit
    blob = bytearray(size)
    res["bites"] = False
    del blob
except MemoryError:
    res["bites"] = True
res["rss_before"] = status("VmRSS")
res["scan"] = run(["scan", base, tuned, "-q", "-o", out, "--top-k", "4"])
res["rss_peak"] = status("VmHWM")
cap(4 << 20)
res["starved"] = run(["scan", base, tuned, "-q", "-o", out + ".starved.json", "--top-k", "4"])
print(json.dumps(res))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")
def test_scan_streams_a_pair_larger_than_its_memory_limit(tmp_path):
    base, tuned = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    size = _write_pair(base, tuned)
    assert size > MARGIN * 1.5  # each checkpoint alone exceeds what the process may add
    warm = [str(tmp_path / "warm-base.safetensors"), str(tmp_path / "warm-tuned.safetensors")]
    _write_pair(*warm, n_big=1)
    out = str(tmp_path / "report.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="1",
               MALLOC_MMAP_THRESHOLD_=str(128 * 1024), INTRUDER_HOST_BUDGET_MB=str(BUDGET_MB),
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    env["INTRUDER_CACHE_DIR"] = str(tmp_path / "cache")  # the default scan, minus the user's cache
    # RLIMIT_AS caps virtual address space, and the CUDA driver reserves far more of it than it
    # uses: this measures the host path, so no GPU (on a CUDA machine the process aborted).
    env["CUDA_VISIBLE_DEVICES"] = ""
    # a hang here (TimeoutExpired) is a failure: out of memory must end the scan, not stall it
    # Two cores whatever the machine: thread pools (and their stacks) grow with the core count,
    # and on 32 cores OpenMP could not start its threads inside the address-space limit.
    cpus = sorted(os.sched_getaffinity(0))[:2]
    proc = subprocess.run([sys.executable, "-c", _DRIVER, base, tuned, *warm, out, str(MARGIN),
                           str(size)], env=env, capture_output=True, text=True, timeout=240,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["warm"] == [0, ""]
    assert m["bites"], "the address-space cap does not stop holding one checkpoint in memory"
    assert m["scan"] == [0, ""], m["scan"]
    # resident memory grew by far less than one checkpoint: tensors were read a few at a time
    grew = m["rss_peak"] - m["rss_before"]
    assert grew < size / 2, m
    doc = json.load(open(out))
    layers = {l["name"]: l for l in doc["layers"]}
    assert len(layers) == N_BIG + len(PLANTED)
    for name, rank in PLANTED.items():
        assert layers[name]["status"] == "scanned"
        assert [i["index"] for i in layers[name]["intruders"]] == [rank]
    unchanged = [l for l in layers.values() if l["status"] == "unchanged"]
    assert len(unchanged) == N_BIG  # every big matrix was read from both files and compared
    assert doc["summary"]["total_intruders"] == len(PLANTED)
    # starved: one line, exit 1, and no report
    code, err = m["starved"]
    assert code == 1, code
    assert len(err.splitlines()) == 1 and err.startswith("Error: out of memory"), err
    assert not os.path.exists(out + ".starved.json")
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []
    print(f"baseline VmSize {m['baseline'] / MiB:.0f} MiB, cap +{MARGIN / MiB:.0f} MiB, "
          f"checkpoints {size / MiB:.0f} MiB each, RSS growth {grew / MiB:.0f} MiB")


def test_host_budget_grows_with_the_largest_item_not_with_the_model(monkeypatch):
    from intruder.run.stream import AUTO_HOST_BUDGET_MAX, DEFAULT_HOST_BUDGET, host_budget

    monkeypatch.delenv("INTRUDER_HOST_BUDGET_MB", raising=False)
    mib = 2 ** 20
    assert host_budget(10 * mib, 3) == DEFAULT_HOST_BUDGET  # small pairs: the fixed default
    # a fleet's group of one 7B MLP matrix (base + 4 fine-tunes, 450 MiB): one per worker + 1
    assert host_budget(450 * mib, 3) == 4 * 450 * mib
    assert host_budget(5 * 2 ** 30, 3) == AUTO_HOST_BUDGET_MAX  # capped
    monkeypatch.setenv("INTRUDER_HOST_BUDGET_MB", "64")  # the user's setting wins
    assert host_budget(450 * mib, 3) == 64 * mib
