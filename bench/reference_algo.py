"""(a) The paper's algorithm as its public code runs it, timed per matrix.

Per matrix, one after another: both weights to the device in float32, two full
`torch.linalg.svd(W, full_matrices=False)`, `|U_t^T U_b|` over every pair of vectors, max over the
base vectors, the first k compared with epsilon. Tensors are read with the safetensors library
(the reference loads whole models; reading per matrix only makes it cheaper).

    python bench/reference_algo.py BASE_DIR TUNED_DIR --names N1,N2 --device cuda --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def _index(d: str) -> dict:
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as fh:
            wm = json.load(fh)["weight_map"]
        return {n: os.path.join(d, f) for n, f in wm.items()}
    from safetensors import safe_open

    p = d if d.endswith(".safetensors") else os.path.join(d, "model.safetensors")
    with safe_open(p, framework="pt") as f:
        return {n: p for n in f.keys()}


def _load(path: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)


def reference(base: str, tuned: str, names, device: str, k: int = 10, eps: float = 0.5):
    """{name: {max_cos: [k], intruders: int, seconds: float}} for each name, in order."""
    bi, ti = _index(base), _index(tuned)
    out = {}
    for name in names:
        t0 = time.perf_counter()
        w0 = _load(bi[name], name).to(device).float()  # (m, n)
        wt = _load(ti[name], name).to(device).float()  # (m, n)
        u_b, _, _ = torch.linalg.svd(w0, full_matrices=False)  # (m, r)
        u_t, _, _ = torch.linalg.svd(wt, full_matrices=False)  # (m, r)
        dots = torch.abs(torch.einsum("ji,jk->ik", u_t, u_b))  # (r, r) = |U_t^T U_b|
        best, _ = dots.max(dim=1)  # (r,)
        top = best[:k].cpu()
        n_intr = int((top < eps).sum())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out[name] = {"max_cos": [float(x) for x in top], "intruders": n_intr,
                     "seconds": time.perf_counter() - t0, "shape": list(w0.shape)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("tuned")
    ap.add_argument("--names", required=True, help="comma-separated tensor names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", required=True)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if a.device.startswith("cuda"):
        torch.zeros(1, device=a.device)  # context creation, outside the per-matrix times
    res = reference(a.base, a.tuned, a.names.split(","), a.device)
    with open(a.json, "w") as fh:
        json.dump({"results": res, "loop_seconds": time.perf_counter() - t0}, fh)


if __name__ == "__main__":
    main()
