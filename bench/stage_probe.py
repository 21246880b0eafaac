"""Where one matrix's analysis spends its time, stage by stage, on the scan's device.

For each case (a 7B-shaped pair from bench/synth_models.py: mild LoRA-like or planted intruders),
`engine.analyse` runs once to warm up, then once timed with every stage wrapped in a device
synchronisation (so each stage's time includes the GPU work it queued), then once under
torch.profiler (the busiest operators by self CPU time, and how many device synchronisations
and kernel launches one matrix costs). Stage times nest (base_eig contains gram when it
computes the Gram), so they do not sum to the total.

    python bench/stage_probe.py [--device cuda] [--model 7b] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from synth_models import MODELS, Gen  # noqa: E402

# every module's own binding is wrapped (a name imported into another module is its own
# attribute there): module -> names
STAGES = {
    "intruder.spectral.engine": ("base_eig", "tuned_eig", "spectrum_of", "match_vectors",
                                 "certify_side", "_slices", "update_spectrum",
                                 "margin_measures", "_looks_new", "gram", "eig_full", "eig_top",
                                 "eig_top_lapack"),
    "intruder.spectral.margin": ("spectral_norm_projected", "storage_grid", "rounding_rms",
                                 "delta_singular_values", "spectral_norm", "gram",
                                 "sketch_singular_values"),
    "intruder.spectral.partial": ("_certify", "_rayleigh_ritz", "_chebyshev"),
    "intruder.spectral.decompose": ("derive_other",),
    "intruder.spectral.slices": ("inverse_gram", "leftout_bound"),
}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def instrument(dev, times: dict):
    """Wrap the stage functions (module attributes, so callers inside the package see them)."""
    import importlib

    for mod_name, names in STAGES.items():
        mod = importlib.import_module(mod_name)
        for name in names:
            f = getattr(mod, name, None)
            if f is None or getattr(f, "_probe", False):
                continue

            def wrapped(*a, _f=f, _n=name, **k):
                _sync(dev)
                t0 = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    _sync(dev)
                    dt = time.perf_counter() - t0
                    n, s = times.get(_n, (0, 0.0))
                    times[_n] = (n + 1, s + dt)
            wrapped._probe = True
            setattr(mod, name, wrapped)


def cases(model: str):
    _, h, inter, kv = MODELS[model]
    return [("q mild", (h, h), 0.6, "mild"), ("q heavy", (h, h), 0.6, "heavy"),
            ("gate mild", (inter, h), 0.35, "mild"), ("gate heavy", (inter, h), 0.35, "heavy"),
            ("down heavy", (h, inter), 0.35, "heavy"), ("k mild", (kv, h), 0.6, "mild")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="7b", choices=sorted(MODELS))
    ap.add_argument("--profile", action="store_true", help="also a torch.profiler table per case")
    ap.add_argument("--iterative", action="store_true",
                    help="on a CPU, the GPU route (Chebyshev iteration) instead of LAPACK")
    a = ap.parse_args()
    dev = torch.device(a.device)
    # the scan's CUDA workers run their host linear algebra (small eigh) on one thread each
    # (run/stream.py): the same here, or OpenMP's fork-join on every core inflates those stages
    if dev.type == "cuda":
        torch.set_num_threads(1)
    from intruder.spectral import engine as E
    from intruder.types import ScanConfig

    cfg = ScanConfig(epsilons=(0.5, 0.7, 0.9))
    if a.iterative:
        E.LAPACK_ON_CPU = False
    gen = Gen(dev, 3)
    if dev.type == "cuda":
        from intruder.run.stream import _warm_linalg

        _warm_linalg(dev)
    print(f"# stage probe, {a.model} shapes, device {dev}"
          f"{' ' + torch.cuda.get_device_name(dev) if dev.type == 'cuda' else ''}", flush=True)
    times: dict = {}
    instrument(dev, times)
    for label, (m, n), alpha, kind in cases(a.model):
        w0, s = gen.base(m, n, alpha)
        wt = (gen.planted(w0, s) if kind == "heavy" else gen.mild(w0, s, 0.2))[0]
        w0, wt = w0.to(dev), wt.to(dev)
        E.analyse(w0, wt, cfg, "warm-" + label)  # kernels, handles, sketch blocks
        times.clear()
        _sync(dev)
        t0 = time.perf_counter()
        found, _ = E.analyse(w0, wt, cfg, label)
        _sync(dev)
        total = time.perf_counter() - t0
        row = " ".join(f"{k}={v[1] * 1e3:.1f}ms/{v[0]}" for k, v in
                       sorted(times.items(), key=lambda kv: -kv[1][1]))
        print(f"{label} {m}x{n}: {total * 1e3:.1f} ms [{found.method}] "
              f"intruders {len(found.intruders)} | {row}", flush=True)
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                E.analyse(w0, wt, cfg, label)
                _sync(dev)
            ka = prof.key_averages()
            items = sum(e.count for e in ka if e.key in ("aten::item", "aten::_local_scalar_dense"))
            syncs = sum(e.count for e in ka if "Synchronize" in e.key)
            copies = sum(e.count for e in ka if e.key.startswith("cudaMemcpy"))
            launches = sum(e.count for e in ka if e.key.startswith("cuda") and "Launch" in e.key)
            print(f"  profiler: {len(ka)} operators, {items} item() calls, {syncs} CUDA "
                  f"synchronize calls, {copies} cudaMemcpy calls, {launches} kernel launches",
                  flush=True)
            print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40),
                  flush=True)
        del w0, wt


if __name__ == "__main__":
    main()
