"""Device probe: the ceilings, the primitives the engine is built from, and the engine per matrix.

One call on the GPU machine measures what bench/NOTES.md reasons about: fp64 GEMM rate, Gram,
eigh (alone and from several threads/streams at once), Cholesky, QR, small eigh on GPU vs CPU,
host->device copies; then engine.analyse on real shapes (time split into its stages and max|cos|
error against the exact float64 engine); then a 4-layer Llama-7B-shaped scan end to end with
1-4 streams per GPU, all GPUs, and torchrun.

    python bench/probe_device.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

LOG = []


def say(*a):
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    LOG.append(line)


def t_cuda(f, n=5, warm=1):
    for _ in range(warm):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def micro(dev):
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float64, generator=g)
    t = t_cuda(lambda: a @ a)
    say(f"gemm fp64 4096^3: {t*1e3:.2f} ms = {2*4096**3/t/1e12:.1f} TFLOP/s")
    a32 = a.float()
    t = t_cuda(lambda: a32 @ a32)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    say(f"gemm fp32 4096^3: {t*1e3:.2f} ms = {2*4096**3/t/1e12:.1f} TFLOP/s (tf32 {tf32})")
    w = torch.randn(11008, 4096, device=dev, dtype=torch.float64, generator=g)
    t = t_cuda(lambda: w.mT @ w)
    say(f"gram fp64 11008x4096 -> 4096^2: {t*1e3:.2f} ms")
    sym = a @ a.mT
    t = t_cuda(lambda: torch.linalg.eigh(sym), n=3)
    say(f"eigh fp64 4096: {t*1e3:.1f} ms")
    for nthr in (4,):
        mats = [sym.clone() for _ in range(nthr)]
        streams = [torch.cuda.Stream(dev) for _ in range(nthr)]

        def job(i, streams=streams, mats=mats):
            with torch.cuda.stream(streams[i]):
                for _ in range(2):
                    torch.linalg.eigh(mats[i])
                streams[i].synchronize()
        job(0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ths = [threading.Thread(target=job, args=(i,)) for i in range(nthr)]
        [x.start() for x in ths]
        [x.join() for x in ths]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        say(f"eigh fp64 4096 x{2*nthr} from {nthr} threads/streams: {dt/(2*nthr)*1e3:.1f} ms per matrix")
    m = sym + 4096 * torch.eye(4096, device=dev, dtype=torch.float64)
    t = t_cuda(lambda: torch.linalg.cholesky_ex(m))
    say(f"cholesky fp64 4096: {t*1e3:.2f} ms")
    y = torch.randn(4096, 48, device=dev, dtype=torch.float64, generator=g)
    t = t_cuda(lambda: torch.linalg.qr(y))
    say(f"qr fp64 4096x48: {t*1e3:.2f} ms")
    t = t_cuda(lambda: sym @ y)
    say(f"gemm fp64 4096^2 x 48: {t*1e3:.3f} ms")
    h = (y.mT @ y)
    t = t_cuda(lambda: torch.linalg.eigh(h))
    say(f"eigh fp64 48x48 on GPU: {t*1e3:.2f} ms")
    t = t_cuda(lambda: torch.linalg.eigh(h.cpu())[1].to(dev))
    say(f"eigh fp64 48x48 on CPU incl. transfers: {t*1e3:.2f} ms")
    s32 = torch.randn(4096, 4096, device=dev, generator=g)
    t = t_cuda(lambda: torch.linalg.svd(s32, full_matrices=False), n=2)
    say(f"svd fp32 4096 (reference's call): {t*1e3:.0f} ms")
    x = torch.empty(11008 * 4096, dtype=torch.bfloat16, pin_memory=True)
    xp = torch.empty(11008 * 4096, dtype=torch.bfloat16)
    t = t_cuda(lambda: x.to(dev, non_blocking=True))
    say(f"H2D pinned 90 MB: {t*1e3:.2f} ms = {x.numel()*2/t/1e9:.1f} GB/s")
    t = t_cuda(lambda: xp.to(dev))
    say(f"H2D pageable 90 MB: {t*1e3:.2f} ms = {x.numel()*2/t/1e9:.1f} GB/s")
    t0 = time.perf_counter()
    for _ in range(4):
        torch.empty(11008 * 4096 + 4096 * 7, dtype=torch.bfloat16, pin_memory=True)
    say(f"pinned alloc 90 MB (cached after first): {(time.perf_counter()-t0)/4*1e3:.1f} ms")


def engine_cases(dev):
    from synth_models import Gen

    import intruder.spectral.engine as E
    import intruder.spectral.margin as M
    from intruder.types import ScanConfig

    gen = Gen(dev, 1)
    cfg = ScanConfig()
    stages = {}

    def wrap(mod, name):
        f = getattr(mod, name)

        def g(*a, **k):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = f(*a, **k)
            torch.cuda.synchronize()
            stages[name] = stages.get(name, 0) + time.perf_counter() - t0
            return r
        setattr(mod, name, g)
    for n in ("base_eig", "tuned_eig", "certify_side"):
        wrap(E, n)
    wrap(M, "margin_measures")
    for n in ("update_spectrum", "spectral_norm_projected", "storage_grid", "rounding_rms"):
        wrap(M, n)
    cases = [((4096, 4096), 0.6, 0.2), ((4096, 4096), 0.6, 2.0), ((11008, 4096), 0.35, 0.2),
             ((8192, 8192), 0.6, 0.2), ((28672, 8192), 0.35, 0.2)]
    for (m, n), alpha, rho in cases:
        w0, wt, _, _ = gen.pair(m, n, alpha, rho)
        E.analyse(w0, wt, cfg, "warm")  # warm-up (kernels, handles)
        stages.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f, be = E.analyse(w0, wt, cfg, f"m{m}x{n}")
        torch.cuda.synchronize()
        tf = time.perf_counter() - t0
        fast_st = dict(stages)
        E.EXACT_DIM_CUDA = 10 ** 7
        t0 = time.perf_counter()
        fx, _ = E.analyse(w0, wt, cfg, f"m{m}x{n}")
        torch.cuda.synchronize()
        tx = time.perf_counter() - t0
        E.EXACT_DIM_CUDA = 256
        err = max(abs(a - b) for a, b in zip(f.max_cos, fx.max_cos))
        same = [c < 0.5 for c in f.max_cos] == [c < 0.5 for c in fx.max_cos]
        st = " ".join(f"{k}={v*1e3:.0f}" for k, v in fast_st.items())
        say(f"analyse {m}x{n} rho={rho}: fast {tf*1e3:.0f} ms [{f.method}] exact {tx*1e3:.0f} ms "
            f"err {err:.1e} same={same} intr={len(f.intruders)} | ms: {st}")
        del w0, wt
        torch.cuda.empty_cache()


def scans(out, model="7b", layers=4, device="cuda"):
    from synth_models import build

    work = f"/tmp/probe{model}"
    t0 = time.perf_counter()
    build(model, work, layers, device)
    say(f"generated {layers}-layer {model}-shaped pair in {time.perf_counter()-t0:.1f} s")
    env = dict(os.environ, PYTHONPATH=ROOT)
    n = torch.cuda.device_count() if device == "cuda" else 1

    def scan(tag, extra_env, cache, dev=None, pre=()):
        e = dict(env, **extra_env)
        cmd = [sys.executable, os.path.join(HERE, "_child.py"), "scan",
               f"{work}/base", f"{work}/tuned", "-q", "-o", f"{work}/{tag}.json",
               "--cache-dir", cache, "--device", dev or device]
        if pre:
            cmd = list(pre) + cmd[2:]
        e["INTRUDER_BENCH_RSS"] = f"{work}/{tag}.rss"
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=e, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        rss = open(f"{work}/{tag}.rss").read() if os.path.exists(f"{work}/{tag}.rss") else "0"
        if p.returncode not in (0, 3, 4):
            say(f"{tag}: FAILED {p.returncode}: {p.stderr[-1500:]}")
            return None
        rep = json.load(open(f"{work}/{tag}.json"))
        lay = {l["name"]: l for l in rep["layers"] if l["status"] == "scanned"}
        say(f"scan {tag}: {wall:.2f} s wall, rss {int(rss)/2**30:.2f} GiB, report seconds "
            f"{rep['summary']['seconds'] if 'summary' in rep else rep.get('seconds')}")
        return lay
    base = None
    for s in (1, 2, 3, 4):
        cache = f"{work}/cache-s{s}"
        lay = scan(f"cold-s{s}", {"CUDA_VISIBLE_DEVICES": "0", "INTRUDER_STREAMS": str(s)}, cache)
        scan(f"warm-s{s}", {"CUDA_VISIBLE_DEVICES": "0", "INTRUDER_STREAMS": str(s)}, cache)
        if base is None:
            base = lay
        elif lay is not None:
            d = max(abs(a - b) for nm in base for a, b in zip(base[nm]["max_cos"], lay[nm]["max_cos"]))
            say(f"  streams={s} vs streams=1: max_cos diff {d:.1e}")
    if n >= 2:
        lay = scan("cold-2gpu", {}, f"{work}/cache-m")
        if lay and base:
            d = max(abs(a - b) for nm in base for a, b in zip(base[nm]["max_cos"], lay[nm]["max_cos"]))
            say(f"  2 GPUs vs 1: max_cos diff {d:.1e}")
        lay = scan("cold-torchrun", {"NCCL_NVLS_ENABLE": "0"}, f"{work}/cache-t",
                   pre=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={n}", os.path.join(HERE, "_child.py")))
        if lay and base:
            d = max(abs(a - b) for nm in base for a, b in zip(base[nm]["max_cos"], lay[nm]["max_cos"]))
            say(f"  torchrun vs 1: max_cos diff {d:.1e}, {len(lay)} matrices")
    # raw read bandwidth of the shards (page cache) with 1 and 8 threads
    files = sorted(os.path.join(work, s, f) for s in ("base", "tuned")
                   for f in os.listdir(os.path.join(work, s)) if f.endswith(".safetensors"))
    total = sum(os.path.getsize(f) for f in files)
    for nt in (1, 8):
        buf_sz = 64 << 20
        t0 = time.perf_counter()

        def rd(paths, buf_sz=buf_sz):
            b = bytearray(buf_sz)
            for p in paths:
                with open(p, "rb", buffering=0) as fh:
                    while fh.readinto(b):
                        pass
        chunks = [files[i::nt] for i in range(nt)]
        ths = [threading.Thread(target=rd, args=(c,)) for c in chunks]
        [x.start() for x in ths]
        [x.join() for x in ths]
        say(f"page-cache read {total/1e9:.1f} GB with {nt} threads: {total/1e9/(time.perf_counter()-t0):.1f} GB/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--skip", default="")
    ap.add_argument("--cpu-smoke", action="store_true", help="scan part only, 135m shapes, CPU")
    a = ap.parse_args()
    if a.cpu_smoke:
        scans(a.out, "135m", 2, "cpu")
        return
    dev = torch.device("cuda:0")
    say(f"torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
        f"{os.cpu_count()} CPUs")
    try:
        if "micro" not in a.skip:
            micro(dev)
        if "engine" not in a.skip:
            engine_cases(dev)
        if "scan" not in a.skip:
            scans(a.out)
    finally:
        with open(os.path.join(a.out, "probe.log"), "w") as fh:
            fh.write("\n".join(LOG) + "\n")


if __name__ == "__main__":
    main()
