"""Side-by-side speed of intruder detection on real model shapes, in one run on one machine.

  (a) reference: the paper's code path (per matrix: two full float32 torch.linalg.svd and
      |U_t^T U_b|), timed on the first --ref-layers layers and scaled per matrix shape to the
      whole model (stated in the output);
  (b) PEFT reduce_intruder_dimension (detect + mitigate) on the first --peft-layers layers, scaled
      the same way;
  (c) `intruder scan` cold: whole process wall time (Python start, reading every file, all
      matrices), empty base spectral cache;
  (d) `intruder scan` warm: the same command again, base spectra from the cache;
  and, where several GPUs are visible, (c) on all of them in one process and under torchrun.
Decisions of (c) are compared with (a) on the reference layers, and max|cos| with the float64
exact engine (full Gram eigendecomposition, the path tests hold to numpy's LAPACK).

Every run measures both kinds of pair (bench/synth_models.py): `mild` (intruders in 16 of 224
7B matrices) and `heavy` (planted new directions in the top-10 of every matrix of half the
layers), each in its own section. Decisions are compared at epsilon 0.5, 0.7 and 0.9; a max|cos|
the engine reports as a certified upper bound (max_cos_bound) is checked to bound the exact value
from above, the others to equal it.

    python bench/scan_speed.py --model 7b                 # one H200: Llama-2-7B shapes
    python bench/scan_speed.py --model 7b --kinds heavy   # one kind only
    python bench/scan_speed.py --model 70b --layers 2     # 70B subset, full model extrapolated
    OMP_NUM_THREADS=2 python bench/scan_speed.py --model 135m --device cpu
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from synth_models import KINDS, MODELS, build, shapes  # noqa: E402

EPSILONS = (0.5, 0.7, 0.9)


def run(cmd, env=None, rss=False, quiet=True):
    """Wall seconds (and peak RSS bytes) of one child process."""
    e = dict(os.environ)
    e.update(env or {})
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    rss_file = None
    if rss:
        rss_file = os.path.join(e.get("TMPDIR", "/tmp"), f"rss-{os.getpid()}-{time.time_ns()}")
        e["INTRUDER_BENCH_RSS"] = rss_file
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=e, stdout=subprocess.DEVNULL if quiet else None,
                       stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode not in (0, 3, 4):
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    peak = None
    if rss_file and os.path.exists(rss_file):
        with open(rss_file) as fh:
            peak = int(fh.read())
        os.unlink(rss_file)
    return wall, peak


def scan_cmd(work, out, cache, device, extra=()):
    return [sys.executable, os.path.join(HERE, "_child.py"), "scan", os.path.join(work, "base"),
            os.path.join(work, "tuned"), "-q", "-o", out, "--cache-dir", cache,
            "--device", device, "--epsilon", ",".join(map(str, EPSILONS)), *extra]


def load(path):
    with open(path) as fh:
        return json.load(fh)


def layers_of(report):
    return {l["name"]: l for l in report["layers"] if l.get("status") == "scanned"}


def compare(a, b, stats=None):
    """(max |max_cos difference| over values both report exactly, number of matrices whose
    top-k decisions at any of EPSILONS differ). Values flagged as certified upper bounds
    (max_cos_bound) are left out of the difference; with `stats` (a dict) their count and
    whether each bounds the other side's value from above are recorded there."""
    err, diff = 0.0, 0
    n_bound, bound_ok = 0, True
    for name, la in a.items():
        lb = b.get(name)
        if lb is None:
            continue
        ca, cb = la["max_cos"], lb["max_cos"]
        fa = la.get("max_cos_bound") or [False] * len(ca)
        fb = lb.get("max_cos_bound") or [False] * len(cb)
        for x, y, bx, by in zip(ca, cb, fa, fb):
            if bx or by:
                n_bound += 1
                bound_ok &= (not bx or x >= y - 1e-12) and (not by or y >= x - 1e-12)
            else:
                err = max(err, abs(x - y))
        if any([x < e for x in ca] != [y < e for y in cb] for e in EPSILONS):
            diff += 1
    if stats is not None:
        stats.update(bound=n_bound, bound_ok=bound_ok)
    return err, diff


def extrapolate(per_name, model, n_layers):
    """Per-shape mean seconds from the timed matrices, times each shape's count in the model."""
    by_shape = {}
    for r in per_name.values():
        by_shape.setdefault(tuple(r["shape"]), []).append(r["seconds"])
    total = 0.0
    for _, shp in shapes(model):
        ts = by_shape.get(tuple(shp))
        if not ts:
            return None
        total += sum(ts) / len(ts) * n_layers
    return total


def machine(device):
    if device.startswith("cuda"):
        try:
            name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True).stdout.strip().splitlines()
            return f"{len(name)} x {name[0]}, {os.cpu_count()} CPU cores"
        except (OSError, IndexError):
            return "CUDA GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


LOG = []


def note(line: str, logfile=None):
    print(line, flush=True)
    LOG.append(line)
    if logfile:
        with open(logfile, "a") as fh:
            fh.write(line + "\n")


def append_results(path: str, title: str, device: str, text: str) -> None:
    """Append one dated section (title, machine, the command line as run, `text`) to the
    results file (markdown)."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    with open(path, "a") as fh:
        fh.write(f"\n## {title}, {stamp}\n\nmachine: {machine(device)}  \n"
                 f"command: `{cmd}`\n\n{text}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--layers", type=int, default=0, help="layers to generate (0: the model's)")
    ap.add_argument("--ref-layers", type=int, default=1, help="0 skips (a)")
    ap.add_argument("--peft-layers", type=int, default=1, help="0 skips PEFT")
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default=None, help="parent folder of the generated pairs (/tmp)")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--log", default=None, help="also append each line to this file as it comes")
    ap.add_argument("--multi-gpu", action="store_true", help="also time all GPUs / torchrun")
    ap.add_argument("--no-exact", action="store_true", help="skip the float64 exact-engine check")
    ap.add_argument("--repeat", type=int, default=1, help="repeat (c) and (d)")
    ap.add_argument("--keep", action="store_true", help="keep generated checkpoints")
    ap.add_argument("--kinds", default=",".join(KINDS), help="pairs to measure (mild,heavy)")
    a = ap.parse_args()
    for kind in [k for k in a.kinds.split(",") if k]:
        if kind not in KINDS:
            raise SystemExit(f"--kinds: {kind!r} is not one of {KINDS}")
        bench_pair(a, kind)


def bench_pair(a, kind):
    """One pair of one kind: every measurement above, one RESULTS.md section."""
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    dev_arg = "cuda" if cuda else "cpu"
    n_model = MODELS[a.model][0]
    n_gen = a.layers or n_model
    work = os.path.join(a.workdir or "/tmp", f"intruder-bench-{a.model}-{kind}")
    log = a.log
    load_avg = os.getloadavg()
    note(f"# {a.model} shapes, {kind} pair, {n_gen} of {n_model} layers, {machine(device)}, "
         f"load average {load_avg[0]:.2f}", log)
    t_gen = time.perf_counter()
    if not os.path.exists(os.path.join(work, "bench_meta.json")):
        build(a.model, work, n_gen, dev_arg, kind=kind)
    t_gen = time.perf_counter() - t_gen
    note(f"generated in {t_gen:.0f} s (not timed below)", log)
    meta = load(os.path.join(work, "bench_meta.json"))
    names = [m["name"] for m in meta["matrices"]]
    ref_names = [n for n in names if int(n.split(".")[2]) < a.ref_layers]
    rows, checks = [], []
    scale = n_model / n_gen  # whole-model extrapolation of a subset: per-layer cost x layers
    single = {"CUDA_VISIBLE_DEVICES": "0"} if cuda else {}

    # (c) cold, (d) warm
    cache = os.path.join(work, "cache")
    out_c = os.path.join(work, "scan-cold.json")
    out_d = os.path.join(work, "scan-warm.json")
    colds, warms, rss = [], [], []
    for _ in range(a.repeat):
        shutil.rmtree(cache, ignore_errors=True)
        wc, rc = run(scan_cmd(work, out_c, cache, dev_arg), env=single, rss=True)
        note(f"(c) cold: {wc:.2f} s, peak RSS {rc / 2**30 if rc else 0:.2f} GiB", log)
        wd, rd = run(scan_cmd(work, out_d, cache, dev_arg), env=single, rss=True)
        note(f"(d) warm: {wd:.2f} s, peak RSS {rd / 2**30 if rd else 0:.2f} GiB", log)
        colds.append(wc)
        warms.append(wd)
        rss += [rc, rd]
    t_c, t_d = min(colds), min(warms)
    cold, warm = layers_of(load(out_c)), layers_of(load(out_d))
    rep_s = load(out_c).get("summary", {}).get("seconds")
    tag = "" if scale == 1 else f" ({n_gen} of {n_model} layers)"
    rows.append((f"(c) intruder scan, cold cache{tag}", t_c, "measured, whole process"))
    rows.append((f"(d) intruder scan, warm cache{tag}", t_d, "measured, whole process"))
    if scale != 1:
        # the process start is paid once: extrapolate the scan itself, add the start back
        start_c = max(t_c - (rep_s or t_c), 0.0)
        rows.append(("(c) cold, whole model", start_c + (t_c - start_c) * scale,
                     f"extrapolated: start {start_c:.1f} s + scan x {scale:g}"))
    err_cd, diff_cd = compare(cold, warm)
    n_flag = sum(sum(1 for f in (l.get("max_cos_bound") or []) if f) for l in cold.values())
    identical = all(cold[n]["max_cos"] == warm[n]["max_cos"] for n in cold)
    methods = {}
    for l in cold.values():
        methods[l["method"]] = methods.get(l["method"], 0) + 1
    intr = sum(len(l["intruders"]) for l in cold.values())
    peak = max(x for x in rss if x) if any(rss) else None
    checks.append(f"warm (d) reproduces cold (c): {'bit for bit' if identical else f'max diff {err_cd:.1e}'}"
                  f", {diff_cd} decisions differ")
    checks.append(f"intruders found at epsilon 0.5: {intr} in "
                  f"{sum(1 for l in cold.values() if l['intruders'])} of {len(cold)} matrices; "
                  f"methods: {methods}; max|cos| values reported as certified upper bounds: "
                  f"{n_flag} of {sum(len(l['max_cos']) for l in cold.values())}")
    checks.append(f"peak host RSS of intruder scan (VmHWM): {peak / 2**30:.2f} GiB" if peak
                  else "peak RSS: not measured")
    for c in checks[-3:]:
        note(c, log)

    # (a) the paper's algorithm on the first layers, scaled per shape
    t_a_full = None
    if ref_names:
        # on a CPU the paper's code gets every core (torch's default) and, for comparison with
        # earlier runs, one thread; the faster of the two is the baseline every ratio uses
        threads = [0] if cuda else sorted({1, os.cpu_count() or 1})
        timed = []
        for th in threads:
            ref_json = os.path.join(work, f"ref{th}.json")
            env = dict(single)
            if th:
                env.update(OMP_NUM_THREADS=str(th), MKL_NUM_THREADS=str(th))
            w, _ = run([sys.executable, os.path.join(HERE, "reference_algo.py"),
                        os.path.join(work, "base"), os.path.join(work, "tuned"), "--names",
                        ",".join(ref_names), "--device", dev_arg, "--json", ref_json,
                        "--threads", str(th)], env=env)
            ref_th = load(ref_json)["results"]
            start_th = w - sum(r["seconds"] for r in ref_th.values())
            full_th = extrapolate(ref_th, a.model, n_model) + start_th
            how = f"{len(ref_th)} matrices timed, x{n_model} layers + start {start_th:.1f} s"
            label = "(a) paper's algorithm, 2 full fp32 SVD/matrix" + (
                f", {th} thread{'s' if th > 1 else ''}" if th else "")
            timed.append((full_th, label, how, ref_th, start_th))
            note(f"{label}: {len(ref_th)} matrices in "
                 f"{sum(r['seconds'] for r in ref_th.values()):.1f} s + start {start_th:.1f} s -> "
                 f"whole model {full_th:.1f} s", log)
        t_a_full, _, _, ref, startup_a = min(timed, key=lambda x: x[0])
        for i, (full_th, label, how, _, _) in enumerate(sorted(timed, key=lambda x: x[0])):
            rows.insert(i, (label + (" (baseline)" if len(timed) > 1 and i == 0 else ""),
                            full_th, how))
        ref_l = {n: {"max_cos": r["max_cos"]} for n, r in ref.items()}
        err_a, diff_a = compare(ref_l, cold)
        checks.append(f"decisions (c) vs (a) on {len(ref_l)} matrices at epsilon "
                      f"{', '.join(map(str, EPSILONS))}: {diff_a} differ; max |max_cos (c) - (a)| "
                      f"= {err_a:.1e} over exactly reported values ((a) is float32 SVD)")
        note(checks[-1], log)
        if not a.no_exact:
            exact_out = os.path.join(work, "scan-exact.json")
            inc = "|".join(n.replace(".", r"\.") for n in ref_names)
            run(scan_cmd(work, exact_out, os.path.join(work, "cache-exact"), dev_arg,
                         ["--no-cache", "--include", f"^({inc})$", "--exclude",
                          f"^(?!({inc})$)"]), env={**single, "INTRUDER_EXACT_DIM": "1000000"})
            st = {}
            err_x, diff_x = compare(layers_of(load(exact_out)), cold, st)
            checks.append(f"max_cos (c) vs the float64 exact engine (full Gram eigh) on those "
                          f"matrices: max err {err_x:.1e} over exactly reported values, "
                          f"{diff_x} matrices' decisions differ at any epsilon; {st['bound']} "
                          f"values reported as upper bounds, "
                          f"{'each above' if st['bound_ok'] else 'NOT ALL above'} the exact value")
            note(checks[-1], log)

    if a.multi_gpu and cuda and torch.cuda.device_count() >= 2:
        ng = torch.cuda.device_count()
        for label in ("in-process", "torchrun"):
            out_m = os.path.join(work, f"scan-{label}.json")
            shutil.rmtree(cache + label, ignore_errors=True)
            cmd = scan_cmd(work, out_m, cache + label, "cuda")
            if label == "torchrun":
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={ng}"] + cmd[1:]
            try:
                wm, _ = run(cmd, env={"NCCL_NVLS_ENABLE": "0",
                                      "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})
            except SystemExit as exc:
                note(f"{label} {ng} GPUs failed: {str(exc)[-600:]}", log)
                continue
            err, diff = compare(cold, layers_of(load(out_m)))
            rows.append((f"(c) cold, {ng} GPUs, {label}", wm, "measured, whole process"))
            rep_m = load(out_m).get("summary", {}).get("seconds")
            phase = (f"; scan phase (report's seconds, after the process start) {rep_s:.1f} s -> "
                     f"{rep_m:.1f} s = {rep_s / rep_m:.2f}x") if rep_s and rep_m else ""
            checks.append(f"{ng} GPUs {label}: {t_c / wm:.2f}x over one GPU (cold, whole process)"
                          f"{phase}, max_cos diff vs one GPU {err:.1e}, {diff} decisions differ")
            note(checks[-1], log)

    # (b) PEFT
    if a.peft_layers and t_a_full:
        pj = os.path.join(work, "peft.json")
        try:
            run([sys.executable, os.path.join(HERE, "peft_run.py"), work, "--model", a.model,
                 "--layers", str(a.peft_layers), "--device", dev_arg, "--json", pj], env=single)
            pr = load(pj)
            ref_first = sum(r["seconds"] for n, r in ref.items()
                            if int(n.split(".")[2]) < a.peft_layers)
            t_b = pr["seconds"] / ref_first * (t_a_full - startup_a) + startup_a
            rows.insert(1, ("(b) PEFT reduce_intruder_dimension", t_b,
                            f"{pr['matrices']} matrices timed, scaled like (a)"))
            checks.append(f"(b) PEFT: {pr['matrices']} matrices in {pr['seconds']:.1f} s (detect + "
                          f"mitigate, as PEFT does both); intruders there: "
                          f"{sum(pr['intruders'].values())} (PEFT) vs "
                          f"{sum(r['intruders'] for n, r in ref.items() if int(n.split('.')[2]) < a.peft_layers)} (a)")
            note(checks[-1], log)
        except SystemExit as exc:
            checks.append(f"(b) PEFT could not run: {str(exc).splitlines()[-1][:300]}")
            note(checks[-1], log)

    # table
    t_ref = t_a_full
    lines = ["| run | seconds | (a) / run | how |", "|---|---:|---:|---|"]
    for name, secs, how in rows:
        ratio = f"{t_ref / secs:.1f}x" if t_ref else "n/a"
        lines.append(f"| {name} | {secs:.1f} | {ratio} | {how} |")
    if not cuda:
        checks.append(f"load average before the run: {load_avg[0]:.2f} {load_avg[1]:.2f} "
                      f"{load_avg[2]:.2f} (CPU shared with other work)")
    text = "\n".join(lines + [""] + [f"- {c}" for c in checks])
    note(text, log)
    append_results(a.results, f"{a.model} shapes, {kind} pair", device, text)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
