"""(b) PEFT's intruder detection (peft.tuners.lora.intruders.reduce_intruder_dimension), timed.

Builds a LlamaForCausalLM with the benchmark's shapes and its first L layers, loads the base
weights of those layers and the benchmark's LoRA factors into a PeftModel, and times
reduce_intruder_dimension (PEFT's detect + mitigate: per LoRA layer two full float32 SVDs for
detection, and a third SVD to refactor the mitigated update where it found intruders).

    python bench/peft_run.py WORKDIR --model 7b --layers 1 --json OUT
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synth_models import MODELS, MODULES  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--model", required=True)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    _, h, inter, kv = MODELS[a.model]
    head = 64 if h <= 1024 else 128
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=a.layers,
                      num_attention_heads=h // head, num_key_value_heads=kv // head,
                      head_dim=head, vocab_size=128, max_position_embeddings=128)
    t_build = time.perf_counter()
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base_dir = os.path.join(a.workdir, "base")
    with open(os.path.join(base_dir, "model.safetensors.index.json")) as fh:
        wm = json.load(fh)["weight_map"]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for layer in range(a.layers):
            for mod in MODULES:
                name = f"model.layers.{layer}.{mod}.weight"
                with safe_open(os.path.join(base_dir, wm[name]), framework="pt") as f:
                    params[name].copy_(f.get_tensor(name))
    lcfg = LoraConfig(r=16, lora_alpha=16, target_modules=[m.split(".")[1] for m in MODULES])
    pm = get_peft_model(model, lcfg)
    with safe_open(os.path.join(a.workdir, "adapter", "adapter_model.safetensors"),
                   framework="pt") as f:
        keys = set(f.keys())
        with torch.no_grad():
            for mname, mod in pm.named_modules():
                if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                    ka, kb = f"{mname}.lora_A.weight", f"{mname}.lora_B.weight"
                    if ka in keys:
                        mod.lora_A["default"].weight.copy_(f.get_tensor(ka))
                        mod.lora_B["default"].weight.copy_(f.get_tensor(kb))
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t_build = time.perf_counter() - t_build
    logs = []
    t0 = time.perf_counter()
    reduce_intruder_dimension(pm, logging_sink=logs.append)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    counts = {}
    for line in logs:
        m = re.match(r"(.*): (?:Intruders: (\d+)|No intruders)$", str(line))
        if m:
            name = m.group(1).replace("base_model.model.", "", 1) + ".weight"
            counts[name] = int(m.group(2) or 0)
    with open(a.json, "w") as fh:
        json.dump({"seconds": secs, "build_seconds": t_build, "matrices": len(counts),
                   "intruders": counts}, fh)


if __name__ == "__main__":
    main()
