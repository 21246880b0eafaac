"""Benchmark checkpoints: bf16 safetensors pairs with real model shapes and realistic spectra.

Base W0 = U diag(s) V^T, exactly: U, V have orthonormal columns (one QR per shape, then a random
row permutation, sign flip and column permutation per matrix, which keeps them orthonormal), s a
power law s_i ~ (i + 1)^-alpha with 2% jitter (heavy-tailed like trained weights: a few large
directions over a slowly decaying bulk), scaled to an entry rms of 0.02.

Tuned Wt = bf16(W0 + B A): a LoRA-like rank-16 update with Gaussian factors, ||B A||_2 =
rho * sigma_10(W0). Most matrices get rho in [0.05, 0.3] (no intruders: the guide's measured
LoRA fine-tunes moved about 5%, at most 16%, of sigma_10); q_proj and v_proj of every fourth
layer get rho = 2 (strong enough to create intruders), so decisions are not all "none". The
factors are also saved as a PEFT adapter (adapter_config.json + adapter_model.safetensors).

    python bench/synth_models.py --model 7b --out /tmp/llama7b   # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import torch

MODELS = {
    # name: (layers, hidden, intermediate, kv_dim)
    "7b": (32, 4096, 11008, 4096),
    "70b": (80, 8192, 28672, 1024),
    "135m": (30, 576, 1536, 192),
}
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ALPHA = {"q_proj": 0.6, "k_proj": 0.6, "v_proj": 0.4, "o_proj": 0.4, "gate_proj": 0.35,
         "up_proj": 0.35, "down_proj": 0.35}
LORA_RANK = 16
KINDS = ("mild", "heavy")
HEAVY_RANK = 4
HEAVY_AT = (1, 3, 5, 8)  # planted strengths: these (0-based) base singular values


def shapes(model: str) -> list[tuple[str, tuple[int, int]]]:
    """(module, (out, in)) of one decoder layer, nn.Linear layout."""
    _, h, inter, kv = MODELS[model]
    return [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
            ("mlp.down_proj", (h, inter))]


def strong(layer: int, module: str) -> bool:
    return layer % 4 == 3 and module in ("self_attn.q_proj", "self_attn.v_proj")


def heavy(layer: int) -> bool:
    """Layers whose every matrix gets planted new directions in the heavy pair."""
    return layer % 2 == 0


class Gen:
    """Per-shape orthonormal factors, permuted per matrix."""

    def __init__(self, device, seed: int):
        self.device = device
        self.g = torch.Generator(device=device).manual_seed(seed)
        self.q: dict[tuple[int, int], torch.Tensor] = {}

    def basis(self, rows: int, cols: int) -> torch.Tensor:
        key = (rows, cols)
        if key not in self.q:
            a = torch.randn(rows, cols, generator=self.g, device=self.device)
            q, _ = torch.linalg.qr(a)  # (rows, cols)
            self.q[key] = q
        q = self.q[key]
        rp = torch.randperm(rows, generator=self.g, device=self.device)
        cp = torch.randperm(cols, generator=self.g, device=self.device)
        sign = torch.randint(0, 2, (rows, 1), generator=self.g, device=self.device) * 2 - 1
        return (q[rp] * sign)[:, cp]  # (rows, cols) orthonormal columns

    def base(self, m: int, n: int, alpha: float):
        """W0 (m, n) bf16 = U diag(s) V^T and s (r,)."""
        r = min(m, n)
        u = self.basis(m, r)  # (m, r)
        v = self.basis(n, r)  # (n, r)
        i = torch.arange(1, r + 1, device=self.device, dtype=torch.float32)
        s = i ** -alpha * (1 + 0.02 * torch.randn(r, generator=self.g, device=self.device))
        s = s.abs().sort(descending=True).values  # (r,)
        s *= 0.02 * (m * n) ** 0.5 / s.norm()  # entry rms 0.02
        return ((u * s) @ v.mT).to(torch.bfloat16), s

    def mild(self, w0: torch.Tensor, s: torch.Tensor, rho: float):
        """Wt = bf16(W0 + B A), rank 16, ||B A||_2 = rho sigma_10. Returns (wt, a, b)."""
        m, n = w0.shape
        b = torch.randn(m, LORA_RANK, generator=self.g, device=self.device)  # (m, 16)
        a = torch.randn(LORA_RANK, n, generator=self.g, device=self.device)  # (16, n)
        _, rb = torch.linalg.qr(b)  # (16, 16): ||B A||_2 = ||R_b R_a^T||_2, no big SVD
        _, ra = torch.linalg.qr(a.mT)  # (16, 16)
        norm = float(torch.linalg.matrix_norm(rb @ ra.mT, ord=2))
        b = b * (rho * float(s[9]) / norm)
        return (w0.float() + b @ a).to(torch.bfloat16), a, b

    def planted(self, w0: torch.Tensor, s: torch.Tensor):
        """Wt = bf16(W0 + B A), rank 4 along new random unit directions with strengths
        sigma_2, sigma_4, sigma_6, sigma_9 of the base (new directions in the top-10).
        Returns (wt, a (16, n), b (m, 16)), the factors zero-padded to LORA_RANK."""
        m, n = w0.shape
        b = torch.randn(m, HEAVY_RANK, generator=self.g, device=self.device)  # (m, 4)
        a = torch.randn(HEAVY_RANK, n, generator=self.g, device=self.device)  # (4, n)
        b = b / b.norm(dim=0) * s[list(HEAVY_AT)]
        a = a / a.norm(dim=1, keepdim=True)
        bp = torch.zeros(m, LORA_RANK, device=self.device)
        ap = torch.zeros(LORA_RANK, n, device=self.device)
        bp[:, :HEAVY_RANK] = b
        ap[:HEAVY_RANK] = a
        return (w0.float() + b @ a).to(torch.bfloat16), ap, bp


def build(model: str, out: str, layers: int = 0, device: str = "cuda", seed: int = 0,
          shard_layers: int = 4, adapter: bool = True, kind: str = "mild",
          fleet: Sequence[str] = ()) -> dict:
    """Write OUT/base, OUT/tuned (HF-style sharded safetensors) and OUT/adapter; with `fleet`
    (a kind per fine-tune) OUT/ft-0, OUT/ft-1, ... instead of OUT/tuned: several fine-tunes of
    one base."""
    kinds = list(fleet) or [kind]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kind {k!r}: one of {KINDS}")
    from safetensors.torch import save_file

    n_layers = layers or MODELS[model][0]
    gen = Gen(device, seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    tuned = [f"ft-{i}" for i in range(len(kinds))] if fleet else ["tuned"]
    paths = {k: os.path.join(out, k) for k in ["base", *tuned] + (["adapter"] if adapter else [])}
    for p in paths.values():
        os.makedirs(p, exist_ok=True)
    maps: dict[str, dict[str, str]] = {k: {} for k in ["base", *tuned]}
    lora: dict[str, torch.Tensor] = {}
    info = []
    for first in range(0, n_layers, shard_layers):
        last = min(n_layers, first + shard_layers)
        shard = f"model-{first // shard_layers + 1:05d}.safetensors"
        tensors: dict[str, dict[str, torch.Tensor]] = {k: {} for k in maps}
        for layer in range(first, last):
            for mod, (m, n) in shapes(model):
                name = f"model.layers.{layer}.{mod}.weight"
                alpha = ALPHA[mod.split(".")[1]]
                rho = 2.0 if strong(layer, mod) else \
                    float(0.05 + 0.25 * torch.rand(1, generator=gen.g, device=device))
                w0, s = gen.base(m, n, alpha)
                tensors["base"][name] = w0.cpu()
                rhos = []
                for j, (k, side) in enumerate(zip(kinds, tuned)):
                    if k == "heavy" and heavy(layer):
                        wt, a, b = gen.planted(w0, s)
                        rhos.append(-1.0)  # planted: strengths sigma_2..sigma_9 of the base
                    else:
                        wt, a, b = gen.mild(w0, s, rho)
                        rhos.append(rho)
                    tensors[side][name] = wt.cpu()
                    if j == 0 and adapter:
                        pre = f"base_model.model.model.layers.{layer}.{mod}"
                        lora[f"{pre}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
                        lora[f"{pre}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
                info.append({"name": name, "shape": [m, n], "rho": rhos[0], "rhos": rhos})
        for side in maps:
            save_file(tensors[side], os.path.join(paths[side], shard), metadata={"format": "pt"})
            for name in tensors[side]:
                maps[side][name] = shard
        del tensors
    for side in maps:
        with open(os.path.join(paths[side], "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": maps[side]}, fh)
    if adapter:
        save_file(lora, os.path.join(paths["adapter"], "adapter_model.safetensors"))
        cfg = {"peft_type": "LORA", "r": LORA_RANK, "lora_alpha": LORA_RANK,
               "target_modules": [m.split(".")[1] for m in MODULES], "use_rslora": False,
               "fan_in_fan_out": False, "init_lora_weights": True, "task_type": "CAUSAL_LM"}
        with open(os.path.join(paths["adapter"], "adapter_config.json"), "w") as fh:
            json.dump(cfg, fh)
    meta = {"model": model, "kind": kind, "fleet": kinds if fleet else None, "layers": n_layers,
            "matrices": info, "seed": seed, "seconds": time.perf_counter() - t0}
    with open(os.path.join(out, "bench_meta.json"), "w") as fh:
        json.dump(meta, fh)
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", choices=KINDS, default="mild")
    ap.add_argument("--fleet", default="", help="comma-separated kinds: several fine-tunes")
    a = ap.parse_args()
    fleet = [k for k in a.fleet.split(",") if k]
    meta = build(a.model, a.out, a.layers, a.device, a.seed, kind=a.kind, fleet=fleet)
    print(f"wrote {a.model} pair ({meta['layers']} layers) to {a.out} in {meta['seconds']:.1f} s")


if __name__ == "__main__":
    main()
