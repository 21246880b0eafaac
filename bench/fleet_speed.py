"""Fleet speed: `intruder compare BASE FT1 ... FTn`, the marginal cost of one more fine-tune.

Generates one base and n fine-tunes of it (bench/synth_models.py --fleet, kinds alternating
heavy / mild), then times whole processes, cold cache each:
  compare with 1 fine-tune, compare with all n (one GPU), all n under torchrun (every GPU);
the marginal seconds per fine-tune are (t_n - t_1) / (n - 1). The paper's algorithm is timed on
the first layer of the first two fine-tunes (one of each kind) and scaled per shape to one whole
fine-tune. Decisions of the n-fine-tune document are compared with the float64 exact engine on
those layers (every epsilon; values flagged as upper bounds must lie above the exact ones), and
the torchrun document with the one-GPU one.

    python bench/fleet_speed.py --model 7b --layers 16 --n 4
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from scan_speed import (  # noqa: E402
    EPSILONS,
    append_results,
    compare,
    extrapolate,
    layers_of,
    load,
    machine,
    note,
    run,
)
from synth_models import MODELS, build  # noqa: E402


def compare_cmd(work, fts, out, device, extra=()):
    return [sys.executable, os.path.join(HERE, "_child.py"), "compare", os.path.join(work, "base"),
            *[os.path.join(work, f) for f in fts], "-q", "--no-cache", "-o", out, "--device",
            device, "--epsilon", ",".join(map(str, EPSILONS)), *extra]


def entries(path):
    return [layers_of(e["vs_base"]) for e in load(path)["entries"]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="7b")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="fine-tunes (>= 2)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--log", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    work = os.path.join(a.workdir, f"intruder-fleet-{a.model}")
    kinds = ["heavy" if i % 2 == 0 else "mild" for i in range(a.n)]
    note(f"# fleet: {a.model} shapes, {a.layers} of {MODELS[a.model][0]} layers, base + {a.n} "
         f"fine-tunes ({','.join(kinds)}), {machine(device)}", a.log)
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(work, "bench_meta.json")):
        build(a.model, work, a.layers, "cuda" if cuda else "cpu", fleet=kinds, adapter=False)
    note(f"generated in {time.perf_counter() - t0:.0f} s (not timed below)", a.log)
    meta = load(os.path.join(work, "bench_meta.json"))
    fts = [f"ft-{i}" for i in range(a.n)]
    single = {"CUDA_VISIBLE_DEVICES": "0"} if cuda else {}
    rows, checks = [], []
    out1, outn = os.path.join(work, "c1.json"), os.path.join(work, "cn.json")
    t1, _ = run(compare_cmd(work, fts[:1], out1, device), env=single)
    note(f"compare, 1 fine-tune, 1 GPU: {t1:.2f} s", a.log)
    tn, _ = run(compare_cmd(work, fts, outn, device), env=single)
    note(f"compare, {a.n} fine-tunes, 1 GPU: {tn:.2f} s", a.log)
    marg = (tn - t1) / (a.n - 1)
    per_full = MODELS[a.model][0] / a.layers
    rows.append((f"compare, 1 fine-tune ({a.layers} layers)", t1, "whole process, 1 GPU"))
    rows.append((f"compare, {a.n} fine-tunes", tn, "whole process, 1 GPU"))
    rows.append(("marginal seconds per fine-tune", marg, f"(t{a.n} - t1) / {a.n - 1}, 1 GPU"))
    rows.append(("marginal per whole-model fine-tune", marg * per_full,
                 f"x {per_full:g} (layers), 1 GPU"))
    ng = torch.cuda.device_count() if cuda else 0
    if ng >= 2:
        outt = os.path.join(work, "ct.json")
        cmd = compare_cmd(work, fts, outt, device)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ng}"] + cmd[1:]
        try:
            tt, _ = run(cmd, env={"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})
            note(f"compare, {a.n} fine-tunes, {ng} GPUs torchrun: {tt:.2f} s", a.log)
            rows.append((f"compare, {a.n} fine-tunes, {ng} GPUs (torchrun)", tt,
                         f"whole process; {tn / tt:.2f}x over 1 GPU"))
            same = all(compare(x, y)[1] == 0 and compare(x, y)[0] == 0.0
                       for x, y in zip(entries(outn), entries(outt)))
            checks.append(f"{ng}-GPU torchrun document vs 1 GPU: "
                          f"{'identical max_cos and decisions' if same else 'DIFFERS'}")
        except SystemExit as exc:
            checks.append(f"torchrun failed: {str(exc)[-400:]}")
    # (a) on the first layer of the first two fine-tunes, scaled to one whole fine-tune
    ref_names = [m["name"] for m in meta["matrices"] if int(m["name"].split(".")[2]) < 1]
    docs = entries(outn)
    t_ref = []
    for i, ft in enumerate(fts[:2]):
        rj = os.path.join(work, f"ref-{i}.json")
        w, _ = run([sys.executable, os.path.join(HERE, "reference_algo.py"),
                    os.path.join(work, "base"), os.path.join(work, ft), "--names",
                    ",".join(ref_names), "--device", "cuda" if cuda else "cpu", "--json", rj],
                   env=single)
        ref = load(rj)["results"]
        start = w - sum(r["seconds"] for r in ref.values())
        t_ref.append(extrapolate(ref, a.model, MODELS[a.model][0]))
        err_a, diff_a = compare({n: {"max_cos": r["max_cos"]} for n, r in ref.items()}, docs[i])
        # the float64 exact engine on the same matrices
        xo = os.path.join(work, f"exact-{i}.json")
        inc = "|".join(n.replace(".", r"\.") for n in ref_names)
        run([sys.executable, os.path.join(HERE, "_child.py"), "scan", os.path.join(work, "base"),
             os.path.join(work, ft), "-q", "--no-cache", "-o", xo, "--device",
             "cuda" if cuda else "cpu", "--epsilon", ",".join(map(str, EPSILONS)), "--include",
             f"^({inc})$", "--exclude", f"^(?!({inc})$)"],
            env={**single, "INTRUDER_EXACT_DIM": "1000000"})
        st = {}
        err_x, diff_x = compare(layers_of(load(xo)), docs[i], st)
        checks.append(f"{ft} ({kinds[i]}): vs (a) {diff_a} of {len(ref)} matrices' decisions "
                      f"differ (max |diff| {err_a:.1e}, (a) float32); vs the float64 exact engine "
                      f"{diff_x} differ, max err {err_x:.1e} over exact values, {st['bound']} "
                      f"upper bounds {'all above' if st['bound_ok'] else 'NOT ALL above'} the "
                      f"exact value; (a) start {start:.1f} s")
        note(checks[-1], a.log)
    if t_ref:
        mean_ref = sum(t_ref) / len(t_ref)
        rows.append(("(a) paper's algorithm, one whole-model fine-tune", mean_ref,
                     f"mean of the {len(t_ref)} kinds, 7 matrices timed each, scaled per shape"))
        checks.append(f"marginal per whole-model fine-tune vs (a): "
                      f"{mean_ref / (marg * per_full):.1f}x")
    intr = [sum(len(l["intruders"]) for l in d.values()) for d in docs]
    bounds = [sum(sum(1 for f in (l.get("max_cos_bound") or []) if f) for l in d.values())
              for d in docs]
    checks.append(f"intruders per fine-tune at 0.5: {intr}; upper-bound values: {bounds}")
    lines = ["| run | seconds | how |", "|---|---:|---|"]
    lines += [f"| {n} | {s:.1f} | {h} |" for n, s, h in rows]
    text = "\n".join(lines + [""] + [f"- {c}" for c in checks])
    note(text, a.log)
    append_results(a.results, f"fleet compare, {a.model} shapes", device, text)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
